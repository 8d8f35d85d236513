"""fp16 with a gradient scaler (issue 10), on CPU with tiny models: ``--precision fp16`` runs the forwards under
float16 autocast (LM head, log-softmax and heads in float32) and every training stage (PPO and the rungs, SFT,
RM) scales its loss with ``torch.amp.GradScaler``; a step whose gradients overflow is skipped by the scaler,
counted and logged, and the scale lowered — the run continues; the scaler's state is checkpointed, so a resumed
run equals the uninterrupted one; where fp16 cannot work it is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from proxrl.errors import ConfigError, NumericsError
from proxrl.lm import update as lm_update
from proxrl.lm.config import PPOConfig, RLConfig, RMConfig, SFTConfig
from proxrl.lm.data import write_jsonl
from proxrl.lm.tiny import make_tiny
from proxrl.run import sgd
from proxrl.run.sgd import sgd_epochs

OVERFLOW = 1e8  # × the loss scale 2¹⁶: far beyond float16's 65504 in the backward through the fp16 matmuls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama", hidden=32, seed=0))


def reward(p, r):
    return [sum(c == "a" for c in x) / 6 for x in r]


def trainer(tiny, **kw):
    from proxrl.lm import PPOTrainer

    args = dict(policy=tiny, out="unused", batch_size=8, num_minibatches=2, micro_batch_size=4, update_epochs=2,
                response_length=6, chat_template="off", finetune="full", lr=1e-3, seed=0, precision="fp16")
    args.update(kw)
    return PPOTrainer(PPOConfig(**args), reward=reward)


def overflow_at(monkeypatch, module, calls: set[int]) -> list[int]:
    """Make the ``n``-th backward (n in ``calls``, counted from 1) of ``module`` overflow in fp16: its loss is
    multiplied by 1e8 before the scaler scales it. Returns the call counter."""
    count = [0]
    orig = module.backward

    def backward(loss, scaler=None):
        count[0] += 1
        orig(loss * OVERFLOW if count[0] in calls else loss, scaler)

    monkeypatch.setattr(module, "backward", backward)
    return count


# ------------------------------------------------------------------ the loop
def test_sgd_epochs_with_a_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    """One loop for every stage: with a scaler, step 1's inf gradient leaves the weights and Adam untouched,
    halves the scale and is recorded; step 2 steps. Without a scaler the same gradient still raises."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    params = list(lin.parameters())
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(6, 4)
    calls = [0]

    def step(idx, where):
        calls[0] += 1
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lin(x[idx]).float().pow(2).mean()
        sgd.backward(loss * (float("inf") if calls[0] == 1 else 1.0), scaler)
        return {"loss": float(loss)}

    w0 = [p.detach().clone() for p in params]
    seen = []
    res = sgd_epochs([opt], params, 1, lambda: [torch.arange(3)], 1.0, 1, step,
                     after_step=lambda e, st, g: seen.append((g, [p.detach().clone() for p in params])), scaler=scaler)
    assert res.skipped == [True] and res.steps_skipped == 1 and scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(a, b) for a, b in zip(w0, seen[0][1])) and seen[0][0] != seen[0][0]  # NaN norm
    assert not opt.state  # Adam never stepped
    res = sgd_epochs([opt], params, 1, lambda: [torch.arange(3)], 1.0, 1, step, scaler=scaler)
    assert res.skipped == [False] and res.grad_norms[0] > 0
    assert not all(torch.equal(a, b.detach()) for a, b in zip(w0, params))
    calls[0] = 0
    with pytest.raises(NumericsError, match=r"^gradient norm: (NaN|inf) at update 1"):
        sgd_epochs([opt], params, 1, lambda: [torch.arange(3)], 1.0, 1,
                   lambda idx, where: (lin(x[idx]).sum() * float("inf")).backward() or {})


# ------------------------------------------------------------------ PPO
def test_fp16_ppo_weights_move_in_float32_masters_with_float32_logits(tiny):
    tr = trainer(tiny)
    assert isinstance(tr.scaler, torch.amp.GradScaler) and tr.policy.amp == torch.float16
    trained = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    for _ in range(3):
        ro = tr.generate([f"p{i}" for i in range(8)])
        m = tr.step(ro, tr.score(ro))
        assert m["skipped"] is None and m["steps_skipped"] == 0 and m["loss_scale"] == 2.0 ** 16
    changed = sum(int((p.detach() != trained[n]).sum()) for n, p in tr.policy.named_parameters() if p.requires_grad)
    assert changed > 0.5 * sum(p.numel() for p in trained.values())
    logp, v, _ = tr.policy(ro.ids, ro.mask, ro.response_ids.shape[1], values=True)
    assert logp.dtype == torch.float32 and v.dtype == torch.float32 and torch.isfinite(logp).all()
    assert trainer(tiny, precision="bf16").scaler is None and trainer(tiny, precision="fp32").scaler is None


def test_fp16_ppo_overflow_is_skipped_logged_and_the_run_continues(tiny, monkeypatch):
    """The first minibatch's gradients overflow: the update skips that one optimizer step (of 4), says so in
    its metrics, halves the scale and trains on; the next update skips nothing at the lowered scale."""
    tr = trainer(tiny)
    overflow_at(monkeypatch, lm_update, {1})
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    ro = tr.generate([f"p{i}" for i in range(8)])
    m = tr.step(ro, tr.score(ro))
    assert m["skipped"] is None and m["steps_skipped"] == 1 and m["loss_scale"] == 2.0 ** 15
    assert m["grad_norm"] > 0  # the mean over the 3 steps taken
    assert any(not torch.equal(p.detach(), before[n]) for n, p in tr.policy.named_parameters() if p.requires_grad)
    ro = tr.generate([f"p{i}" for i in range(8)])
    m = tr.step(ro, tr.score(ro))
    assert m["steps_skipped"] == 0 and m["loss_scale"] == 2.0 ** 15


def test_fp16_ppo_every_step_overflowing_is_no_error_and_the_weights_stay(tiny, monkeypatch):
    tr = trainer(tiny)
    overflow_at(monkeypatch, lm_update, set(range(1, 100)))
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    ro = tr.generate([f"p{i}" for i in range(8)])
    m = tr.step(ro, tr.score(ro))
    assert m["steps_skipped"] == 4 and m["grad_norm"] is None and m["loss_scale"] == 2.0 ** 12
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.policy.named_parameters() if p.requires_grad)


def test_fp16_an_update_undone_by_on_nonfinite_skip_restores_the_scale_too(tiny, monkeypatch):
    """``on_nonfinite='skip'`` puts weights, Adam and the gradient scaler back as they were before the update:
    an update whose overflow halved the scale and which then fails its weight check leaves the scale as before."""
    from proxrl.lm import ppo_trainer

    tr = trainer(tiny, on_nonfinite="skip")
    ro = tr.generate([f"p{i}" for i in range(8)])
    assert tr.step(ro, tr.score(ro))["loss_scale"] == 2.0 ** 16
    overflow_at(monkeypatch, lm_update, {1})

    def bad(named, update):
        raise NumericsError(f"weight x after the optimizer step: NaN at update {update}")

    monkeypatch.setattr(ppo_trainer, "check_parameters", bad)
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    ro = tr.generate([f"p{i}" for i in range(8)])
    m = tr.step(ro, tr.score(ro))
    assert m["skipped"].startswith("weight x") and tr.scaler.get_scale() == 2.0 ** 16
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.policy.named_parameters() if p.requires_grad)


def ppo_run(tiny, tmp_path, name, updates, **kw):
    from proxrl.lm.ppo_trainer import ppo

    cfg = PPOConfig(policy=tiny, reward="unused:fn", prompts=str(tmp_path / "prompts.jsonl"), out=str(tmp_path / name),
                    updates=updates, batch_size=4, num_minibatches=2, micro_batch_size=2, update_epochs=2,
                    response_length=5, eval_prompts=2, chat_template="off", finetune="full", lr=1e-3, seed=2,
                    precision="fp16", checkpoint_every=1, **kw)
    logs = []
    ppo(cfg, reward=reward, log=logs.append)
    return logs


def test_fp16_ppo_resume_equals_the_uninterrupted_run_with_the_scaler_state(tiny, tmp_path, monkeypatch):
    """4 updates straight vs 2 + resume to 4, with an injected overflow in update 1 (this small batch also
    overflows by itself once at the initial scale 2¹⁶, as fp16 runs do: 2 skipped steps, scale 2¹⁴ at the
    checkpoint): every metrics line (wall-clock aside, loss_scale included) and every checkpointed tensor agree."""
    from safetensors.torch import load_file

    from proxrl.run import checkpoint

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i} say"} for i in range(10)])
    overflow_at(monkeypatch, lm_update, {2})
    logs = ppo_run(tiny, tmp_path, "straight", 4)
    assert any("update   1/4  fp16: 2 optimizer step(s) skipped" in line and "loss scale now 16384" in line
               for line in logs), logs
    overflow_at(monkeypatch, lm_update, {2})
    ppo_run(tiny, tmp_path, "split", 2)
    st = json.loads((checkpoint.latest(tmp_path / "split" / "checkpoints") / "state.json").read_text())
    assert st["grad_scaler"]["scale"] == 2.0 ** 14
    monkeypatch.undo()
    ppo_run(tiny, tmp_path, "split", 4, resume=str(tmp_path / "split"))
    wall = {"time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time"}
    rows = lambda d: [{k: v for k, v in json.loads(l).items() if k not in wall}
                      for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    a, b = rows("straight"), rows("split")
    assert len(a) == len(b) == 4 and a == b
    assert a[0]["steps_skipped"] == 2 and [r["loss_scale"] for r in a] == [2.0 ** 14] * 4
    ta = load_file(str(checkpoint.latest(tmp_path / "straight" / "checkpoints") / "tensors.safetensors"))
    tb = load_file(str(checkpoint.latest(tmp_path / "split" / "checkpoints") / "tensors.safetensors"))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------ SFT and RM
def test_fp16_sft_learns_and_an_overflow_is_one_skipped_logged_step(tiny, tmp_path, monkeypatch):
    from proxrl.lm import sft_trainer

    write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"q{i}", "response": "ab"} for i in range(8)])
    overflow_at(monkeypatch, sft_trainer, {3})  # micro-batches of 4: step 2's first
    logs = []
    s = sft_trainer.sft(SFTConfig(model=tiny, data=str(tmp_path / "demos.jsonl"), out=str(tmp_path / "sft"), epochs=10,
                                  batch_size=8, micro_batch_size=4, lr=1e-2, finetune="full", precision="fp16"),
                        log=logs.append)
    rows = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows[:3]] == [0, 1, 0] and rows[1]["grad_norm"] is None
    assert [r["loss_scale"] for r in rows[:3]] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15]
    assert any("sft step 2" in line and "SKIPPED" in line for line in logs)
    assert s["steps_skipped"] == 1 and rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_fp16_reward_model_learns_and_an_overflow_is_one_skipped_logged_step(tiny, tmp_path, monkeypatch):
    """This small RM overflows by itself at the initial scale (fp16's usual start: the scale halves until the
    gradients fit). An overflow injected at the first step that would have been taken is skipped too, with
    its log line, the scale halved once more, and the RM still learns."""
    from proxrl.lm import rm as rm_module

    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "aaaa", "rejected": "zzzz"} for i in range(20)])

    def run(name, calls):
        overflow_at(monkeypatch, rm_module, calls)  # one micro-batch per step: call n = step n
        logs = []
        s = rm_module.reward_model(RMConfig(model=tiny, data=str(tmp_path / "prefs.jsonl"), out=str(tmp_path / name),
                                            epochs=4, batch_size=8, micro_batch_size=8, lr=3e-3, eval_fraction=0.2,
                                            finetune="full", precision="fp16"), log=logs.append)
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "final" not in l]
        return s, rows, logs

    s0, rows0, _ = run("rm0", set())
    first = next(r["step"] for r in rows0 if r["skipped"] == 0)
    s1, rows1, logs = run("rm1", {first})
    assert [r["skipped"] for r in rows1[:first]] == [r["skipped"] for r in rows0[:first - 1]] + [1]
    assert rows1[first - 1]["grad_norm"] is None and rows1[first - 1]["loss_scale"] == rows0[first - 1]["loss_scale"] / 2
    assert any(f"rm step {first} " in l and "SKIPPED: fp16 gradients overflowed" in l for l in logs), logs
    assert s1["steps_skipped"] == sum(r["skipped"] for r in rows1) >= s0["steps_skipped"] + 1
    assert s0["eval_accuracy"] == 1.0 and s1["eval_accuracy"] == 1.0


# ------------------------------------------------------------------ refused where it cannot work
@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_fp16_with_non_float32_weights_is_one_config_error(tiny, dtype):
    with pytest.raises(ConfigError, match=r"^precision: fp16 compute needs float32 weights"):
        PPOConfig(policy=tiny, reward="x:y", precision="fp16", dtype=dtype).validate(need_prompts=False)
    with pytest.raises(ConfigError, match=r"^precision: "):
        SFTConfig(model=tiny, data="d.jsonl", precision="fp16", dtype=dtype).validate()


def test_fp16_with_trpo_is_one_config_error(tiny):
    with pytest.raises(ConfigError, match=r"^precision: fp16 needs a gradient scaler.*trpo"):
        RLConfig(algo="trpo", policy=tiny, reward="x:y", precision="fp16").validate(need_prompts=False)
    RLConfig(algo="grpo", policy=tiny, reward="x:y", precision="fp16").validate(need_prompts=False)  # an SGD rung: fine
