"""The ladder on tokens (`proxrl rlhf train --algo RUNG`): the sequence baselines against naive loops, RLOO's
unbiasedness by exact enumeration, GRPO ≡ pg-baseline group-norm for one step, the importance-sampled
gradient at θ_old ≡ the vanilla one, the one-line refusals, `train --algo ppo-clip` ≡ `rlhf ppo`, and each
rung raising a checkable reward on a tiny random model."""

import itertools
import json

import pytest
import torch

from proxrl import core, objective


# --------------------------------------------------------------------------- pure functions vs naive loops
def naive_rloo(R, k):
    out = []
    for i in range(len(R)):
        g = i // k
        others = [R[j] for j in range(g * k, g * k + k) if j != i]
        out.append(sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def naive_group_norm(R, k, scale, eps=1e-4):
    out = []
    for i in range(len(R)):
        g = [R[j] for j in range(i // k * k, i // k * k + k)]
        mean = sum(g) / k
        std = (sum((x - mean) ** 2 for x in g) / (k - 1)) ** 0.5
        out.append((R[i] - mean) / (std + eps) if scale else R[i] - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rloo_baseline_and_group_normalize_match_naive_loops(k):
    R = torch.randn(5 * k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(core.rloo_baseline(R, k), naive_rloo(R.tolist(), k))
    for scale in (True, False):
        torch.testing.assert_close(core.group_normalize(R, k, scale), naive_group_norm(R.tolist(), k, scale))
    torch.testing.assert_close(objective.sequence_advantages(R, "rloo", k), R - naive_rloo(R.tolist(), k))
    torch.testing.assert_close(objective.sequence_advantages(R, "batch-mean", k), R - R.mean())
    torch.testing.assert_close(objective.sequence_advantages(R, "none", k), R)
    with pytest.raises(ValueError):
        core.rloo_baseline(R, 1)
    with pytest.raises(ValueError):
        core.group_normalize(R[:-1], k)


def test_importance_weight_stats():
    lw = torch.tensor([[0.0, 0.0, 0.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    var, ess = core.importance_weight_stats(lw, mask)
    assert var == 0 and ess == pytest.approx(1.0)  # equal weights on the real entries
    var, ess = core.importance_weight_stats(torch.log(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    assert var == pytest.approx(2.0) and ess == pytest.approx(16 / 20)


# --------------------------------------------------------------------------- RLOO is unbiased (exact)
def expected_gradient(theta, r, k, baseline):
    """E over all K-tuples of outcomes of the gradient of −vanilla_pg_loss with the baseline's weights."""
    p = torch.softmax(theta, 0).detach()
    total = torch.zeros_like(theta)
    for outcome in itertools.product(range(len(r)), repeat=k):
        a = torch.tensor(outcome)
        prob = torch.prod(p[a])
        R = r[a]
        adv = objective.sequence_advantages(R, baseline, k)
        th = theta.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(th, 0)[a][None]  # [1, K]: one "step" per sample
        (-core.vanilla_pg_loss(logp, adv[None], torch.ones_like(logp))).backward()
        total += prob * th.grad
    return total


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_gradient_is_exactly_unbiased_and_batch_mean_is_not(k):
    theta = torch.tensor([0.3, -0.8, 0.5], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.0, 0.3, -0.5], dtype=torch.float64)
    (exact,) = torch.autograd.grad((torch.softmax(theta, 0) * r).sum(), theta)  # ∇E[R]
    torch.testing.assert_close(expected_gradient(theta, r, k, "rloo"), exact)
    torch.testing.assert_close(expected_gradient(theta, r, k, "none"), exact)  # plain REINFORCE, unbiased
    # the batch mean includes the sample itself: E = (K−1)/K · ∇E[R], shrunk towards 0 for small K
    biased = expected_gradient(theta, r, k, "batch-mean")
    torch.testing.assert_close(biased, (k - 1) / k * exact)
    assert (biased - exact).abs().max() > 0.01


# --------------------------------------------------------------------------- on a tiny model
pytest.importorskip("transformers")
pytest.importorskip("peft")

from proxrl.errors import ConfigError  # noqa: E402
from proxrl.lm.config import LM_LADDER, RLConfig  # noqa: E402
from proxrl.lm.ppo_trainer import PPOTrainer  # noqa: E402
from proxrl.lm.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def mean_byte(prompts, responses):
    """A reward that varies between every two responses (so group statistics are never degenerate)."""
    return [sum(r.encode()) / max(len(r.encode()), 1) / 255 for r in responses]


def letters(prompts, responses):
    """Checkable reward: the share of lowercase ASCII letters in the response (~26/259 per random token)."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def make_trainer(tiny, **kw):
    args = dict(policy=tiny, reward="unused:fn", prompts="unused", out="unused", batch_size=8,
                micro_batch_size=4, response_length=6, dtype="float64", finetune="full", missing_eos_penalty=None)
    args.update(kw)
    return PPOTrainer(RLConfig(**args), reward=mean_byte)


@pytest.mark.parametrize("algo", ["grpo", "rloo", "pg-baseline"])
def test_a_score_offset_does_not_change_the_baselined_advantages_in_float32(tiny, algo):
    # the baselines are shift-invariant; in float32 the scores 1e6 + 0.01·i rounded to 1e6 (an ulp of 0.06)
    # before the group mean was taken: GRPO's advantages were all 0, a silent update of nothing
    t = make_trainer(tiny, algo=algo, dtype="float32", kl_coef=0.0)
    ro = t.generate([p for p in ("ab", "xyz") for _ in range(4)])
    small = torch.tensor([0.01 * (i % 4) + 0.003 * (i // 4) for i in range(8)], dtype=torch.float64)
    want = t.make_batch(ro, small)[0].adv
    for offset in (1e6, -3e7):
        got = t.make_batch(ro, small + offset)[0].adv
        assert got.dtype == torch.float32 and got.abs().max() > 0.005
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (offset, got[:, 0], want[:, 0])


def test_grpo_one_epoch_one_minibatch_equals_pg_baseline_group_norm(tiny):
    grpo = make_trainer(tiny, algo="grpo", update_epochs=1, num_minibatches=1)
    pgb = make_trainer(tiny, algo="pg-baseline", baseline="group-norm")
    assert (pgb.cfg.samples_per_prompt, grpo.cfg.samples_per_prompt) == (4, 4)
    assert (grpo.cfg.surrogate, pgb.cfg.surrogate) == ("clip", "vanilla")
    prompts = [p for p in ("ab", "xyz") for _ in range(4)]
    rollout = grpo.generate(prompts)
    scores = grpo.score(rollout)
    batch, _ = grpo.make_batch(rollout, scores)
    assert batch.adv.abs().sum() > 0  # a real signal, not a degenerate all-zero advantage
    before = {k: v.clone() for k, v in grpo.policy.trainable_state().items()}
    for tr in (grpo, pgb):
        tr.step(rollout, scores)
    a, b = grpo.policy.trainable_state(), pgb.policy.trainable_state()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-10)
    assert max(float((a[k] - before[k]).abs().max()) for k in a) > 5e-5  # the update did something (one Adam step ≈ lr)


def test_is_gradient_at_theta_old_equals_the_vanilla_gradient(tiny):
    tr = make_trainer(tiny, algo="is-pg")
    rollout = tr.generate(["ab", "hello", "xyz", "q"] * 2)
    batch, _ = tr.make_batch(rollout, tr.score(rollout))
    ids, mask, R = rollout.ids, rollout.mask, batch.shape[1]
    params = [p for p in tr.policy.parameters() if p.requires_grad]
    grads = {}
    for surrogate in ("is", "vanilla"):
        logp, _, _ = tr.policy(ids, mask, R, tr.cfg.temperature, values=False, entropy=False)
        loss, _ = objective.surrogate_loss(surrogate, logp, batch.logp_old, batch.adv, batch.mask)
        grads[surrogate] = torch.autograd.grad(loss, params, allow_unused=True)
    n = 0
    for gi, gv in zip(grads["is"], grads["vanilla"]):
        if gi is None:
            assert gv is None
            continue
        torch.testing.assert_close(gi, gv, rtol=1e-9, atol=1e-12)
        n += int(gi.abs().sum() > 0)
    assert n > 0


def test_is_pg_logs_importance_weight_variance_and_ess(tiny):
    tr = make_trainer(tiny, algo="is-pg", lr=1e-2)
    rollout = tr.generate(["ab", "hello", "xyz", "q"] * 2)
    m = tr.step(rollout, tr.score(rollout))
    assert m["is_weight_var"] > 0 and 0 < m["ess"] < 1
    assert m["explained_variance"] is not None  # is-pg has a critic


@pytest.mark.parametrize("algo", ["pg", "rloo", "grpo"])
def test_critic_free_rungs_train_no_value_head(tiny, algo):
    tr = make_trainer(tiny, algo=algo)
    head = {k: v.clone() for k, v in tr.policy.trainable_state().items() if "value_head" in k}
    rollout = tr.generate(["ab", "xyz"] * 4 if algo == "pg" else [p for p in ("ab", "xyz") for _ in range(4)])
    calls = []  # nor is the value head evaluated: no forward of a critic-free rung reads V
    tr.policy.value_head.register_forward_hook(lambda *a: calls.append(1))
    batch, _ = tr.make_batch(rollout, tr.score(rollout))
    assert torch.equal(batch.values, torch.zeros_like(batch.values))
    m = tr.step(rollout, tr.score(rollout))
    assert m["value_loss"] == 0.0 and m["explained_variance"] is None and not calls
    for k, v in tr.policy.trainable_state().items():
        if k in head:
            assert torch.equal(v, head[k])


def test_group_baseline_needs_prompts_repeated_in_consecutive_rows(tiny):
    tr = make_trainer(tiny, algo="rloo")
    rollout = tr.generate(["ab", "xyz"] * 4)  # interleaved, not grouped
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        tr.make_batch(rollout, tr.score(rollout))


def test_asymmetric_clip_bounds():
    logp_old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.7, 0.9, 1.25, 1.4]], dtype=torch.float64))
    adv = torch.tensor([[-1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones_like(adv)
    sym, frac_sym = core.clipped_loss(logp, logp_old, adv, 0.2, mask)
    same, frac_same = core.clipped_loss(logp, logp_old, adv, 0.2, mask, clip_coef_high=0.2)
    assert torch.equal(sym, same) and torch.equal(frac_sym, frac_same)
    asym, frac = core.clipped_loss(logp, logp_old, adv, 0.2, mask, clip_coef_high=0.28)
    # r = 0.7 (A<0) clipped at 0.8; r = 1.25 (A>0) inside [0.8, 1.28]; r = 1.4 clipped at 1.28
    assert float(asym) == pytest.approx(-(-0.8 - 0.9 + 1.25 + 1.28) / 4)
    assert float(frac) == pytest.approx(0.5) and float(frac_sym) == pytest.approx(0.75)
    cfg = RLConfig(algo="grpo", clip_coef_high=0.28)
    assert (cfg.clip_coef, cfg.clip_coef_low, cfg.clip_coef_high) == (0.2, 0.2, 0.28)


# --------------------------------------------------------------------------- config and CLI
def test_rung_presets():
    got = {a: (c.advantage, c.baseline, c.samples_per_prompt, c.surrogate, c.critic, c.update_epochs)
           for a in LM_LADDER for c in [RLConfig(algo=a)]}
    assert got == {
        "pg": ("sequence", "none", 1, "vanilla", "none", 1),
        "pg-baseline": ("baseline", "batch-mean", 1, "vanilla", "none", 1),
        "rloo": ("baseline", "rloo", 4, "vanilla", "none", 1),
        "grpo": ("baseline", "group-norm", 4, "clip", "none", 2),
        "pg-rtg": ("gae", "none", 1, "vanilla", "head", 1),
        "is-pg": ("gae", "none", 1, "is", "head", 4),
        "ppo-kl": ("gae", "none", 1, "kl-penalty", "head", 2),
        "ppo-clip": ("gae", "none", 1, "clip", "head", 2),
        "trpo": ("baseline", "rloo", 4, "is", "none", 1),
    }
    assert RLConfig(algo="pg-rtg").gae_lambda == 1.0
    c = RLConfig(algo="pg-baseline", baseline="rloo")  # a group baseline brings K = 4 unless K is given
    assert (c.samples_per_prompt, c.advantage) == (4, "baseline")
    c = RLConfig(algo="grpo", update_epochs=5, scale_by_std=False)  # explicit values beat the preset
    assert (c.update_epochs, c.num_minibatches, c.scale_by_std) == (5, 2, False)


@pytest.mark.parametrize("argv,field", [
    (["--algo", "pg-baseline", "--baseline", "group-norm", "--samples-per-prompt", "1"], "samples_per_prompt"),
    (["--algo", "grpo", "--samples-per-prompt", "1"], "samples_per_prompt"),
    (["--algo", "rloo", "--samples-per-prompt", "1"], "samples_per_prompt"),
    (["--algo", "rloo", "--batch-size", "6"], "samples_per_prompt"),
    (["--algo", "pg", "--critic", "head"], "critic"),
    (["--algo", "ppo-clip", "--critic", "none"], "critic"),
])
def test_bad_rung_choices_are_one_line_errors(argv, field, capsys):
    from proxrl.lm.cli import main

    code = main(["train", "--policy", "p", "--reward", "m:f", "--prompts", "x.jsonl", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {field}:"), err


def test_train_ppo_clip_is_rlhf_ppo(tmp_path, tiny):
    """`rlhf train --algo ppo-clip` runs exactly what `rlhf ppo` runs (every metric, wall-clock aside)."""
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import ppo, train

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(10)])
    common = dict(policy=tiny, reward="unused:fn", prompts=str(tmp_path / "p.jsonl"), finetune="full", updates=2,
                  batch_size=4, micro_batch_size=2, response_length=5, eval_prompts=2, checkpoint_every=0)
    s1 = ppo(PPOConfig(out=str(tmp_path / "ppo"), **common), reward=mean_byte, log=lambda *_: None)
    s2 = train(RLConfig(algo="ppo-clip", out=str(tmp_path / "rl"), **common), reward=mean_byte, log=lambda *_: None)
    wall = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time")
    rows = [[{k: v for k, v in json.loads(l).items() if k not in wall} for l in open(tmp_path / d / "metrics.jsonl")]
            for d in ("ppo", "rl")]
    assert rows[0] == rows[1]
    assert s1["reward_after"] == s2["reward_after"]


def test_train_resumes_a_grpo_run_exactly(tmp_path, tiny):
    """A `train --algo grpo` run (K = 4) resumed from its update-2 checkpoint ends bit-identical to the
    uninterrupted run; `rlhf ppo --resume` on it is refused with one line pointing to `rlhf train`."""
    import shutil

    from proxrl.errors import CheckpointError
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import ppo, train
    from proxrl.run import checkpoint
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(10)])
    cfg = RLConfig(algo="grpo", policy=tiny, reward="unused:fn", prompts=str(tmp_path / "p.jsonl"),
                   out=str(tmp_path / "a"), finetune="lora", updates=4, batch_size=8, micro_batch_size=4,
                   response_length=5, eval_prompts=2, checkpoint_every=2, lr=3e-3)
    train(cfg, reward=mean_byte, log=lambda *_: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    train(RLConfig(resume=str(tmp_path / "b")), reward=mean_byte, log=lambda *_: None)
    wall = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time")
    rows = [[{k: v for k, v in json.loads(l).items() if k not in wall} for l in open(tmp_path / d / "metrics.jsonl")]
            for d in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    ta, tb = (load_file(str(checkpoint.latest(tmp_path / d / "checkpoints") / "tensors.safetensors")) for d in "ab")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(CheckpointError, match="rlhf train --resume"):
        ppo(PPOConfig(resume=str(tmp_path / "b")), reward=mean_byte, log=lambda *_: None)


def test_a_reward_that_fails_on_the_held_out_prompts_leaves_the_old_run_and_no_new_one(tmp_path, tiny):
    """The reward's first call (the held-out "before" evaluation) comes before the run directory is made or,
    with overwrite, emptied: a reward that raises there loses no earlier run and leaves no half-made one."""
    from proxrl.errors import ConfigError
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import train

    def broken(prompts, responses):
        raise RuntimeError("no scorer")

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(6)])
    common = dict(algo="pg", policy=tiny, reward="unused:fn", prompts=str(tmp_path / "p.jsonl"), finetune="full",
                  updates=1, batch_size=2, micro_batch_size=2, response_length=2, eval_prompts=2, checkpoint_every=0)
    train(RLConfig(out=str(tmp_path / "old"), **common), reward=mean_byte, log=lambda *_: None)
    files = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="no scorer"):
        train(RLConfig(out=str(tmp_path / "old"), overwrite=True, **common), reward=broken, log=lambda *_: None)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()} == files
    with pytest.raises(ConfigError, match="no scorer"):
        train(RLConfig(out=str(tmp_path / "new"), **common), reward=broken, log=lambda *_: None)
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- learning
def run_rung(tmp_path, algo, seed=0, updates=20, **kw):
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import train

    model = make_tiny(tmp_path / "m", hidden=32, layers=2, seed=1)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(32)])
    cfg = RLConfig(algo=algo, policy=str(model), reward="unused:fn", prompts=str(tmp_path / "p.jsonl"),
                   out=str(tmp_path / algo), finetune="full", updates=updates, batch_size=16, micro_batch_size=16,
                   response_length=8, temperature=1.0, lr=1e-2, missing_eos_penalty=None, eval_prompts=0,
                   seed=seed, checkpoint_every=0, **kw)
    train(cfg, reward=letters, log=lambda *_: None)
    rows = [json.loads(l) for l in open(tmp_path / algo / "metrics.jsonl")]
    r = [x["reward_mean"] for x in rows]
    return sum(r[:5]) / 5, sum(r[-5:]) / 5, rows


@pytest.mark.parametrize("algo", ["pg-baseline", "rloo", "grpo", "ppo-clip"])
def test_rung_raises_a_checkable_reward(tmp_path, algo):
    """20 updates × 16 responses of 8 tokens (2–4 s each): the share of lowercase letters rises from ~0.10 to
    ~0.25–0.43 (seeds 0 and 1 measured); the bar (+0.1) leaves room for seed-to-seed spread."""
    first, last, _ = run_rung(tmp_path, algo)
    assert last > first + 0.1, (algo, first, last)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["pg", "pg-rtg", "is-pg", "ppo-kl"])
def test_noisy_rungs_run_and_mostly_learn(tmp_path, algo):
    """The rungs the derivation calls noisy (pg: no baseline; pg-rtg: an untrained critic; is-pg: no
    constraint, the importance weights degenerate) run end to end; the bar is lower (+0.03)."""
    first, last, rows = run_rung(tmp_path, algo)
    assert last > first + 0.03, (algo, first, last)
    if algo == "is-pg":
        assert all("ess" in r and "is_weight_var" in r for r in rows)


# --------------------------------------------------------------------------- loss aggregation: Dr.GRPO's constant
def test_constant_loss_aggregation_is_the_hand_formula():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    assert float(core.aggregate(x, mask, "constant", 8)) == (1 + 2 + 4) / (2 * 8)  # B × max response length
    assert float(core.aggregate(x, mask, "constant")) == (1 + 2 + 4) / (2 * 3)
    assert float(core.aggregate(x, mask, "token-mean")) == (1 + 2 + 4) / 3
    assert float(core.aggregate(x, mask, "seq-mean")) == (1.5 + 4) / 2
    with pytest.raises(ValueError, match="constant"):
        core.aggregate(x, mask, "sum")


@pytest.mark.parametrize("algo", ["pg", "grpo"])
def test_constant_loss_aggregation_micro_batch_8x1_equals_1x8(tiny, algo):
    """--loss-agg constant: Σ_tokens loss / (B × response_length), with response_length the configured maximum
    (not the batch's longest response), and the same gradient whatever the micro-batch size."""
    tr = make_trainer(tiny, algo=algo, loss_agg="constant", response_length=6)
    prompts = [f"p{i}" for i in range(8)] if algo == "pg" else [p for p in ("ab", "xyz") for _ in range(4)]
    ro = tr.generate(prompts)
    batch, _ = tr.make_batch(ro, tr.score(ro))
    tr.cfg.response_length = 11  # the constant L, larger than any response here
    assert batch.shape[1] < 11
    params = [p for p in tr.policy.parameters() if p.requires_grad]
    grads, stats = {}, {}
    for micro in (1, 8):
        tr.cfg.micro_batch_size = micro
        tr.optimizer.zero_grad(set_to_none=True)
        stats[micro] = tr.accumulate(batch, ro.ids, ro.mask, torch.arange(8))
        grads[micro] = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    torch.testing.assert_close(grads[1], grads[8], atol=1e-12, rtol=1e-9)
    logp, _, _ = tr.policy(ro.ids, ro.mask, batch.shape[1], tr.cfg.temperature, values=False, entropy=False)
    ratio = torch.exp(logp - batch.logp_old)
    per_token = -(logp * batch.adv) if algo == "pg" else -torch.minimum(ratio * batch.adv, ratio.clamp(0.8, 1.2) * batch.adv)
    hand = (per_token * batch.mask).sum() / (8 * 11)
    assert stats[1]["policy_loss"] == pytest.approx(float(hand.detach()), rel=1e-10)
    assert stats[8]["policy_loss"] == pytest.approx(float(hand.detach()), rel=1e-10)
    g_hand = torch.cat([g.reshape(-1) for g in torch.autograd.grad(hand, params, allow_unused=True) if g is not None])
    torch.testing.assert_close(grads[8], g_hand, atol=1e-12, rtol=1e-9)


# --------------------------------------------------------------------------- the policy that does not move
def test_warning_when_the_policy_does_not_move(tiny, capsys):
    """KL to π_old and clip fraction < 1e-6 for 3 consecutive updates: one stderr line, once per run."""
    tr = make_trainer(tiny, algo="pg", lr=1e-12)
    for i in range(5):
        ro = tr.generate(["ab", "xyz"] * 4)
        m = tr.step(ro, tr.score(ro))
        assert m["approx_kl"] == 0.0 and m["approx_kl_after"] < 1e-6  # one step: the in-update KL is before it
        err = [line for line in capsys.readouterr().err.splitlines() if "not moving" in line]
        assert err == ([] if i != 2 else [
            "warning: policy is not moving (KL to π_old < 1e-06 for 3 updates): raise --lr (LoRA usually needs "
            "1e-4..1e-3), or check that the reward varies between responses"]), (i, err)
    tr = make_trainer(tiny, algo="ppo-clip", lr=1e-2)  # a policy that moves: no line
    for i in range(4):
        ro = tr.generate(["ab", "xyz"] * 4)
        m = tr.step(ro, tr.score(ro))
        assert m["approx_kl"] > 1e-6
    assert "not moving" not in capsys.readouterr().err


def test_not_moving_counter_survives_a_checkpoint(tiny, capsys):
    tr = make_trainer(tiny, algo="pg", lr=1e-12)
    for _ in range(2):
        ro = tr.generate(["ab", "xyz"] * 4)
        tr.step(ro, tr.score(ro))
    tensors, state = tr.checkpoint_state()
    tr2 = make_trainer(tiny, algo="pg", lr=1e-12)
    tr2.load_checkpoint_state(tensors, state)
    assert (tr2.still_updates, tr2.warned_not_moving) == (2, False)
    ro = tr2.generate(["ab", "xyz"] * 4)
    tr2.step(ro, tr2.score(ro))
    assert tr2.warned_not_moving and "not moving" in capsys.readouterr().err


def test_options_a_rung_does_not_use_are_named_and_bad_clip_bounds_refused(tiny):
    """trpo's one natural-gradient step takes no epochs, minibatches or clip bounds, nor a clipped surrogate;
    max_kl is trpo's alone; a clip bound ε_low ≥ 1 leaves no lower clip; top-p with an exact-KL rung is named
    as top_p (it was reported as top_k)."""
    from proxrl.lm.config import ignored_options

    trpo = RLConfig(algo="trpo", policy=tiny, reward="m:f", prompts="p")
    got = ignored_options(trpo, {"update_epochs", "num_minibatches", "clip_coef_high", "max_kl", "lr"})
    assert [g.split(":")[0] for g in got] == ["update_epochs", "num_minibatches", "clip_coef_high"]
    clip = RLConfig(algo="ppo-clip", policy=tiny, reward="m:f", prompts="p")
    got = ignored_options(clip, {"max_kl", "clip_coef_high", "train_layers", "scale_by_std"})
    assert sorted(g.split(":")[0] for g in got) == ["max_kl", "scale_by_std", "train_layers"]
    assert ignored_options(RLConfig(algo="grpo", policy=tiny, reward="m:f", prompts="p"), {"scale_by_std"}) == []
    for kw, field in ((dict(algo="ppo-clip", clip_coef_low=1.5), "clip_coef_low"),
                      (dict(algo="trpo", surrogate="clip"), "surrogate"),
                      (dict(algo="trpo", top_p=0.9), "top_p")):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            RLConfig(policy=tiny, reward="m:f", prompts="p", **kw).validate(need_prompts=False)


def test_ladder_first_and_last_rewards_never_share_an_update():
    from proxrl.lm.ladder import summarise

    def run(rewards):  # the fields summarise reads of a finished run
        return {"algo": "pg", "seed": 1, "metrics": [{"reward_mean": r} for r in rewards], "reward_before": 0.0,
                "reward_after": 0.0, "kl_ref_after": 0.0, "wall_time": 1.0}

    for rewards, first, last in (([0.1, 0.5], 0.1, 0.5), ([0.0, 0.2, 1.0], 0.0, 1.0),
                                 ([0, 0, 0, 1, 1, 1, 1], 0.0, 1.0)):
        row = summarise([run(rewards)], ["pg"])[0]
        assert (row["train_reward_first"], row["train_reward_last"]) == pytest.approx((first, last)), row
    row = summarise([run([0.3])], ["pg"])[0]  # one update: no first and last ("–"), not the same update twice
    assert row["train_reward_first"] is None and row["train_reward_last"] is None, row
