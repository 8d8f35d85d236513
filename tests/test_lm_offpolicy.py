"""Truly off-policy rollouts on tokens (rung 4): responses sampled by the policy of L updates ago
(`--rollout-lag L`) or by another engine (``Rollout.logp_behaviour``), corrected by per-token importance
weights π_old/μ (`--is-correction none|truncate|mask`, cap C), with the IS diagnostics on tokens and
sequences; lag 0 is exactly the on-policy estimator; a lagged run resumes exactly."""

import json

import pytest
import torch

from proxrl import core

pytest.importorskip("transformers")

from proxrl.lm.config import RLConfig  # noqa: E402
from proxrl.lm.ppo_trainer import PPOTrainer  # noqa: E402
from proxrl.lm.tiny import make_tiny  # noqa: E402

PROMPTS = ["ab", "hello", "xyz", "q"] * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def letters(prompts, responses):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def make_trainer(tiny, **kw):
    args = dict(policy=tiny, reward="unused:fn", prompts="unused", out="unused", batch_size=8, micro_batch_size=4,
                response_length=6, dtype="float64", finetune="full", missing_eos_penalty=None, algo="is-pg", lr=1e-2)
    args.update(kw)
    return PPOTrainer(RLConfig(**args), reward=letters)


def test_behaviour_correction_modes():
    lp_old = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]], dtype=torch.float64))
    lp_mu = torch.log(torch.tensor([[0.25, 0.4, 0.3, 0.3]], dtype=torch.float64))  # w = 2, 0.5, 3, 1
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    w, m = core.behaviour_correction(lp_old, lp_mu, mask, "none", 2.0)
    assert w.tolist() == [[1.0] * 4] and torch.equal(m, mask)
    w, m = core.behaviour_correction(lp_old, lp_mu, mask, "truncate", 2.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 2.5, 0.0]], dtype=torch.float64))
    assert torch.equal(m, mask)
    w, m = core.behaviour_correction(lp_old, lp_mu, mask, "mask", 2.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 0.0, 0.0]], dtype=torch.float64))
    assert m.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    for mode in ("truncate", "mask"):  # μ = π_old: weight exactly 1 on every real token
        w, m = core.behaviour_correction(lp_old, lp_old, mask, mode, 2.0)
        assert torch.equal(w, mask) and torch.equal(m, mask)
    with pytest.raises(ValueError):
        core.behaviour_correction(lp_old, lp_mu, mask, "clip", 2.0)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_lag_zero_corrected_estimator_equals_the_on_policy_one(tiny, mode):
    """Behaviour log-probs recorded from the policy itself (μ = π_old): the corrected update is the on-policy
    update, to the last bit."""
    plain, corrected = make_trainer(tiny), make_trainer(tiny, is_correction=mode)
    rollout = plain.generate(PROMPTS)
    scores = plain.score(rollout)
    m_plain = plain.step(rollout, scores)
    rollout.logp_behaviour = corrected.rollouts.logp(rollout).clone()  # an outside engine's log-probs
    m_corr = corrected.step(rollout, scores)
    a, b = plain.policy.trainable_state(), corrected.policy.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m_corr["behaviour_ess"] == pytest.approx(1.0) and m_corr["behaviour_weight_var"] == 0
    assert m_corr["behaviour_capped_fraction"] == 0 and m_plain["policy_loss"] == m_corr["policy_loss"]


def test_a_lagged_sampler_is_the_policy_of_l_updates_ago(tiny):
    tr = make_trainer(tiny, rollout_lag=2)
    snaps = [{k: v.clone() for k, v in tr.policy.trainable_state().items()}]
    for u in range(1, 5):
        rollout = tr.generate(PROMPTS)
        if u == 1:
            assert rollout.logp_behaviour is None  # nothing older yet: on-policy
        else:
            sampler = snaps[max(0, u - 1 - 2)]  # θ_{u-1-L}, the oldest there is while u ≤ L
            assert all(torch.equal(tr.lagged[0][k], sampler[k]) for k in sampler)
            current = {k: v.clone() for k, v in tr.policy.trainable_state().items()}
            tr.policy.load_trainable(sampler)
            want = tr.rollouts.logp(rollout)
            tr.policy.load_trainable(current)
            torch.testing.assert_close(rollout.logp_behaviour, want, rtol=0, atol=0)
            assert not torch.equal(rollout.logp_behaviour, tr.rollouts.logp(rollout))  # μ ≠ π_old: off-policy
            assert all(torch.equal(tr.policy.trainable_state()[k], current[k]) for k in current)  # restored
        m = tr.step(rollout, tr.score(rollout))
        snaps.append({k: v.clone() for k, v in tr.policy.trainable_state().items()})
        for key in ("behaviour_weight_var", "behaviour_ess", "behaviour_ess_seq", "behaviour_kl",
                    "behaviour_capped_fraction"):
            assert key in m
    assert m["behaviour_kl"] > 0 and m["behaviour_ess"] < 1 and m["behaviour_ess_seq"] <= 1


def test_evaluation_samples_from_the_policy_itself(tiny):
    tr = make_trainer(tiny, rollout_lag=1)
    for _ in range(2):
        r = tr.generate(PROMPTS)
        tr.step(r, tr.score(r))
    ev = tr.evaluate(["ab", "xyz"], seed=7)
    again = tr.rollouts.generate(["ab", "xyz"], 7)
    assert [e["response"] for e in ev["responses"]] == again.responses


def test_bad_off_policy_options_are_one_line(tiny):
    from proxrl.errors import ConfigError

    for kw, field in ((dict(rollout_lag=-1), "rollout_lag"), (dict(is_cap=0.5), "is_cap"),
                      (dict(is_correction="clip"), "is_correction")):
        with pytest.raises(ConfigError, match=field):
            RLConfig(policy=tiny, reward="m:f", prompts="p", algo="is-pg", **kw).validate(need_prompts=False)


def test_a_lagged_run_resumes_exactly(tmp_path, tiny):
    """The lagged samplers are in the checkpoint: a run extended from its update-3 checkpoint ends identical to
    one run straight through (without them update 4 would sample from the wrong policy)."""
    import shutil

    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import train
    from proxrl.run import checkpoint
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(10)])
    common = dict(algo="is-pg", policy=tiny, reward="unused:fn", prompts=str(tmp_path / "p.jsonl"), finetune="lora",
                  batch_size=8, micro_batch_size=4, response_length=5, eval_prompts=2, lr=3e-3, rollout_lag=2,
                  is_correction="truncate")
    train(RLConfig(out=str(tmp_path / "a"), updates=5, checkpoint_every=0, **common), reward=letters, log=lambda *_: None)
    train(RLConfig(out=str(tmp_path / "b"), updates=3, checkpoint_every=0, **common), reward=letters, log=lambda *_: None)
    train(RLConfig(resume=str(tmp_path / "b"), updates=5), reward=letters, log=lambda *_: None)
    wall = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time")
    rows = [[{k: v for k, v in json.loads(l).items() if k not in wall} for l in open(tmp_path / d / "metrics.jsonl")]
            for d in "ab"]
    assert rows[0] == rows[1] and len(rows[0]) == 5
    ta, tb = (load_file(str(checkpoint.latest(tmp_path / d / "checkpoints") / "tensors.safetensors")) for d in "ab")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(k.startswith("lagged/1/") for k in ta)
    del shutil
