"""Rung 7 on tokens (`rlhf train --algo trpo`): the Fisher-vector product is the Fisher and CG solves
(F + λI) s = g (against a dense Fisher built from per-token score vectors on a tiny LoRA); after a step the
exact mean per-token KL(π_old‖π_θ), measured by hand, is ≤ δ and the surrogate improved; a step that exceeds
δ is backtracked; a step that cannot improve is rejected and the weights restored bit for bit; trpo on
several processes and with a critic are one-line refusals; a short run raises a checkable reward."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from proxrl import core  # noqa: E402
from proxrl.errors import ConfigError  # noqa: E402
from proxrl.lm.config import RLConfig  # noqa: E402
from proxrl.lm.ppo_trainer import PPOTrainer  # noqa: E402
from proxrl.lm.tiny import make_tiny  # noqa: E402
from proxrl.lm import trust_region as TR  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def mean_byte(prompts, responses):
    return [sum(r.encode()) / max(len(r.encode()), 1) / 255 for r in responses]


def make_trainer(tiny, **kw):
    args = dict(algo="trpo", policy=tiny, reward="unused:fn", prompts="unused", out="unused", batch_size=8,
                micro_batch_size=3, response_length=5, dtype="float64", finetune="lora", missing_eos_penalty=None,
                lora_r=2)
    args.update(kw)
    tr = PPOTrainer(RLConfig(**args), reward=mean_byte)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at 0, which makes every gradient w.r.t. A zero: start elsewhere
        for name, p in tr.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    return tr


def batch_of(tr, prompts):
    ro = tr.generate(prompts)
    scores = tr.score(ro)
    batch, _ = tr.make_batch(ro, scores)
    return ro, scores, batch


def full_log_softmax(tr, ro, R):
    with torch.no_grad():
        return tr.policy.log_softmax(ro.ids, ro.mask, R, tr.cfg.temperature)


def mean_kl(old, new, mask):
    return float(((old.exp() * (old - new)).sum(-1) * mask).sum() / mask.sum())


def surrogate(tr, ro, batch):
    """J = token-mean of π_θ/π_old · A, by hand on the whole batch."""
    with torch.no_grad():
        lp = tr.policy.log_softmax(ro.ids, ro.mask, batch.shape[1], tr.cfg.temperature)
        logp = lp.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        return float((torch.exp(logp - batch.logp_old) * batch.adv * batch.mask).sum() / batch.mask.sum())


def test_fvp_is_the_fisher_and_cg_solves_it(tiny):
    tr = make_trainer(tiny, lora_r=1, lora_target="q_proj", batch_size=2, samples_per_prompt=1,
                      baseline="batch-mean", response_length=3, micro_batch_size=1)
    ro, _, batch = batch_of(tr, ["ab", "hello"])
    params = TR.policy_parameters(tr.policy)
    P = sum(p.numel() for p in params)
    assert P == 2 * 2 * 32  # 2 layers × (A: 1×32, B: 32×1)
    passes = TR._Passes(tr.policy, tr.cfg, batch, ro.ids, ro.mask, 0.0)
    # the dense Fisher of the mean per-token KL: F = 1/n Σ_t Σ_v p_tv ∇log p_tv ∇log p_tvᵀ
    lp = tr.policy.log_softmax(ro.ids, ro.mask, batch.shape[1], tr.cfg.temperature)  # [2, R, V]
    F = torch.zeros(P, P, dtype=torch.float64)
    n = float(batch.mask.sum())
    for b, t in batch.mask.nonzero().tolist():
        p = lp[b, t].detach().exp()
        for v in range(lp.shape[-1]):
            gv = core.flat_grad(lp[b, t, v], params, retain_graph=True)
            F += p[v] / n * torch.outer(gv, gv)
    assert torch.linalg.matrix_rank(F) > 10
    x = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fx = F @ x  # agreement measured: ~3e-8 of max |F x| (float64)
    torch.testing.assert_close(passes.fvp(params, x), fx, atol=1e-6 * float(fx.abs().max()), rtol=0)
    g, _ = passes.gradient(params)
    lam = 0.01
    s = core.conjugate_gradient(lambda v: passes.fvp(params, v) + lam * v, g, iters=P, residual_tol=1e-30)
    dense = torch.linalg.solve(F + lam * torch.eye(P, dtype=torch.float64), g)
    torch.testing.assert_close(s, dense, atol=1e-5 * float(dense.abs().max()), rtol=0)
    assert float((s - g / lam).abs().max()) > 0.1 * float(dense.abs().max())  # not merely the damped gradient


def test_trpo_step_stays_in_the_trust_region_and_improves(tiny):
    tr = make_trainer(tiny)
    prompts = [p for p in ("ab", "xyz") for _ in range(4)]
    ro, scores, batch = batch_of(tr, prompts)
    old = full_log_softmax(tr, ro, batch.shape[1])
    j_old = surrogate(tr, ro, batch)
    m = tr.step(ro, scores)
    new = full_log_softmax(tr, ro, batch.shape[1])
    kl = mean_kl(old, new, batch.mask)
    assert m["ls_accepted"] is True
    assert 0 < kl <= tr.cfg.max_kl  # the exact check, by hand, on the whole batch at once
    assert m["kl_old_exact"] == pytest.approx(kl, rel=1e-9)
    improvement = surrogate(tr, ro, batch) - j_old
    assert improvement > 0 and m["ls_improvement"] == pytest.approx(improvement, rel=1e-8)
    assert m["policy_loss"] == pytest.approx(-surrogate(tr, ro, batch), rel=1e-9)


def test_a_step_beyond_delta_is_backtracked_and_a_bad_one_rejected(tiny):
    tr = make_trainer(tiny)
    prompts = [p for p in ("ab", "xyz") for _ in range(4)]
    ro, _, batch = batch_of(tr, prompts)
    params = TR.policy_parameters(tr.policy)
    passes = TR._Passes(tr.policy, tr.cfg, batch, ro.ids, ro.mask, 0.0)
    theta_old = TR.get_flat(params).clone()
    old = full_log_softmax(tr, ro, batch.shape[1])
    step = TR.natural_step(passes, params, 1)
    assert step.expected_improvement > 0
    big = 4.0 * step.full_step  # ½ sᵀFs = 16 δ
    TR.set_flat(params, theta_old + big)
    assert mean_kl(old, full_log_softmax(tr, ro, batch.shape[1]), batch.mask) > tr.cfg.max_kl
    TR.set_flat(params, theta_old)
    res, at = TR.line_search(passes, params, theta_old, big, step.j0)
    assert res.accepted and res.backtracks >= 1 and res.step_fraction == pytest.approx(0.8 ** res.backtracks)
    kl = mean_kl(old, full_log_softmax(tr, ro, batch.shape[1]), batch.mask)
    assert kl <= tr.cfg.max_kl and at["kl"] == pytest.approx(kl, rel=1e-9) and res.improvement > 0
    # along −s the surrogate only gets worse: every trial is refused, the weights are put back exactly
    TR.set_flat(params, theta_old)
    res, at = TR.line_search(passes, params, theta_old, -step.full_step, step.j0)
    assert not res.accepted and res.backtracks == tr.cfg.backtrack_iters
    assert torch.equal(TR.get_flat(params), theta_old) and at["kl"] == 0.0


def test_trpo_with_fsdp_is_refused_in_one_line(tiny, monkeypatch):
    """trpo runs on several processes with ddp (tests/test_distributed.py); fsdp shards the flat gradient its
    conjugate gradient works on."""
    from proxrl.run import dist

    monkeypatch.setattr(dist, "context", lambda device="cpu": dist.Dist(rank=0, world=2))
    with pytest.raises(ConfigError, match="^parallel: trpo's conjugate gradient works on the whole flat gradient"):
        make_trainer(tiny, parallel="fsdp")


@pytest.mark.parametrize("argv,field", [
    (["--algo", "trpo", "--critic", "head", "--advantage", "gae"], "critic"),
    (["--algo", "trpo", "--max-kl", "0"], "max_kl"),
    (["--algo", "trpo", "--ent-coef", "0.01"], "ent_coef"),
])
def test_bad_trpo_choices_are_one_line_errors(argv, field, capsys):
    from proxrl.lm.cli import main

    code = main(["train", "--policy", "p", "--reward", "m:f", "--prompts", "x.jsonl", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {field}:"), err


def test_trpo_raises_a_checkable_reward(tmp_path):
    """`rlhf train --algo trpo` end to end (20 updates × 16 responses × 8 tokens, full fine-tune of the tiny
    model, δ = 0.3), 4 seeds: the share of lowercase letters rises on every seed and by 0.05 on average (last 5
    updates against the first 5; measured gains 0.044 / 0.063 / 0.185 / 0.103 — the trajectory of one seed moves
    with the last bit of the advantages, which the conjugate gradient amplifies, so no single seed is asserted
    on its own); the KL constraint holds and every update's line search is logged."""
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import train

    def letters(prompts, responses):
        return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]

    model = make_tiny(tmp_path / "m", hidden=32, layers=2, seed=1)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(32)])
    gains = []
    for seed in range(4):
        cfg = RLConfig(algo="trpo", policy=str(model), reward="unused:fn", prompts=str(tmp_path / "p.jsonl"),
                       out=str(tmp_path / f"trpo{seed}"), finetune="full", updates=20, batch_size=16,
                       micro_batch_size=16, response_length=8, temperature=1.0, max_kl=0.3, missing_eos_penalty=None,
                       eval_prompts=0, seed=seed, checkpoint_every=0)
        train(cfg, reward=letters, log=lambda *_: None)
        rows = [json.loads(line) for line in open(tmp_path / f"trpo{seed}" / "metrics.jsonl")]
        r = [x["reward_mean"] for x in rows]
        gains.append(sum(r[-5:]) / 5 - sum(r[:5]) / 5)
        assert all("ls_accepted" in x and "ls_backtracks" in x for x in rows)
        assert all(x["kl_old_exact"] <= 0.3 for x in rows)
        assert sum(x["ls_accepted"] for x in rows) >= 15
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.05, gains


def test_trpo_run_resumes_exactly(tmp_path, tiny):
    """A `train --algo trpo` run (LoRA, K = 4) resumed from its update-2 checkpoint ends bit-identical to the
    uninterrupted run (no optimizer step is taken: Adam's state stays empty and is checkpointed as such)."""
    import shutil

    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import train
    from proxrl.run import checkpoint
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(10)])
    cfg = RLConfig(algo="trpo", policy=tiny, reward="unused:fn", prompts=str(tmp_path / "p.jsonl"),
                   out=str(tmp_path / "a"), finetune="lora", updates=4, batch_size=8, micro_batch_size=4,
                   response_length=5, eval_prompts=2, checkpoint_every=2)
    train(cfg, reward=mean_byte, log=lambda *_: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    train(RLConfig(resume=str(tmp_path / "b")), reward=mean_byte, log=lambda *_: None)
    wall = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in wall}
             for line in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    assert any(r["ls_step_fraction"] > 0 for r in rows[0])
    ta, tb = (load_file(str(checkpoint.latest(tmp_path / d / "checkpoints") / "tensors.safetensors")) for d in "ab")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_trpo_with_fsdp_under_torchrun_is_one_line_on_every_rank(tmp_path):
    """Two real gloo processes: each prints the same one-line refusal and nothing is trained or written."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from proxrl.lm.data import write_jsonl

    make_tiny(tmp_path / "model", seed=0)
    (tmp_path / "reward.py").write_text("def share(p, r):\n    return [0.0 for _ in r]\n")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(10)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "proxrl", "rlhf", "train", "--algo", "trpo", "--policy",
           str(tmp_path / "model"), "--reward", f"{tmp_path / 'reward.py'}:share", "--prompts",
           str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "run"), "--updates", "1", "--batch-size", "8",
           "--chat-template", "off", "--parallel", "fsdp"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: parallel: trpo's conjugate gradient")]
    assert p.returncode != 0 and len(errors) == 2, p.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
