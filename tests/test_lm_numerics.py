"""Numerics of the LM PPO update: NaN/inf stops the run with an error naming the quantity and the update
(default) or skips the whole update, logged (opt-in); degenerate batches never produce NaN."""

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from proxrl.errors import NumericsError
from proxrl.lm.config import PPOConfig
from proxrl.lm.policy import build_policy
from proxrl.lm.ppo_trainer import PPOTrainer, Rollout
from proxrl.lm.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama", layers=1, hidden=16))


def count_a(prompts, responses):
    return [r.count("a") / max(len(r), 1) for r in responses]


def make_trainer(tiny, reward=count_a, **kw):
    args = dict(policy=tiny, reward="unused:fn", prompts="unused", out="unused", batch_size=4, num_minibatches=2,
                micro_batch_size=2, update_epochs=1, response_length=5, finetune="lora", lora_r=2,
                missing_eos_penalty=None, chat_template="off")
    args.update(kw)
    cfg = PPOConfig(**args)
    return PPOTrainer(cfg, policy=build_policy(tiny, cfg, cfg.critic), reward=reward)


def finite_metrics(m: dict) -> None:
    bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, bad


def nan_grad(trainer):
    return trainer.policy.value_head.weight.register_hook(lambda g: g * float("nan"))


def test_nonfinite_reward_names_the_reward_function_and_update(tiny):
    def broken(prompts, responses):
        return [float("nan")] + [0.0] * (len(responses) - 1)

    t = make_trainer(tiny, reward=broken)
    r = t.generate(["say 1:"] * 4)
    with pytest.raises(NumericsError, match=r"reward function '.*broken' returned nan .* at update 1"):
        t.score(r)


def test_nonfinite_gradient_stops_by_default_naming_quantity_and_update(tiny):
    t = make_trainer(tiny)
    r = t.generate(["say 1:"] * 4)
    t.step(r, t.score(r))
    h = nan_grad(t)
    r = t.generate(["say 2:"] * 4)
    with pytest.raises(NumericsError, match=r"gradient norm: NaN at update 2 \(epoch 1, minibatch 1\)"):
        t.step(r, t.score(r))
    h.remove()


def test_skip_restores_weights_and_optimizer_and_logs(tiny, capsys):
    t = make_trainer(tiny, on_nonfinite="skip")
    r = t.generate(["say 1:"] * 4)
    t.step(r, t.score(r))
    before = {k: v.clone() for k, v in t.policy.trainable_state().items()}
    adam_before = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(t.optimizer.state.values())}
    h = nan_grad(t)
    r = t.generate(["say 2:"] * 4)
    m = t.step(r, t.score(r))
    h.remove()
    assert m["step"] == 2 and "gradient norm: NaN at update 2" in m["skipped"]
    assert "update 2 skipped" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in t.policy.trainable_state().items())
    for i, s in enumerate(t.optimizer.state.values()):
        assert all(torch.equal(adam_before[i][k], v) for k, v in s.items())
    r = t.generate(["say 3:"] * 4)
    m = t.step(r, t.score(r))
    assert m["skipped"] is None and m["step"] == 3
    finite_metrics(m)


@pytest.mark.parametrize("case", ["one-sample", "identical-rewards", "masked-response", "whiten-rewards"])
def test_degenerate_batches_never_produce_nan(tiny, case):
    n = 1 if case == "one-sample" else 4
    kw = dict(batch_size=n, num_minibatches=1, micro_batch_size=n)
    if case == "whiten-rewards":
        kw["whiten_rewards"] = True
    t = make_trainer(tiny, **kw)
    for _ in range(2):  # a fresh rollout each step (one sampled before an update is refused)
        r = t.generate([f"say {i}:" for i in range(n)])
        scores = torch.zeros(n, dtype=torch.float64) if case != "one-sample" else t.score(r)
        if case == "masked-response":  # a row with no real response token at all
            r = Rollout(r.prompts, r.query_ids, r.query_mask, r.response_ids, r.response_mask.clone(), r.stopped,
                        r.responses)
            r.response_mask[0] = 0
        m = t.step(r, scores)
        finite_metrics(m)
        assert m["skipped"] is None
    assert all(torch.isfinite(p).all() for p in t.policy.trainable_state().values())
