"""NaN/inf in a loss stops the gym run with an error naming the quantity and the update, leaving the last
good checkpoint intact; with ``on_nonfinite='skip'`` the update is undone and logged, never silent."""

from __future__ import annotations

import json

import pytest
import torch

import proxrl
from proxrl import core
from proxrl.run import checkpoint
from proxrl.errors import NumericsError


@pytest.fixture
def nan_at_update_3(monkeypatch):
    calls = {"n": 0}
    real = core.clipped_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, frac = real(*args, **kwargs)
        if calls["n"] == 3:  # preset none: 1 epoch × 1 minibatch per update → the 3rd update
            loss = loss * float("nan")
        return loss, frac

    monkeypatch.setattr(core, "clipped_loss", poisoned)


KW = dict(env="CartPole-v1", algo="ppo-clip", steps=5 * 256, num_envs=4, num_steps=64, update_epochs=1,
          num_minibatches=1, preset="none", progress="off", checkpoint_every=1, seed=5)


def test_nan_stops_and_keeps_last_good_checkpoint(nan_at_update_3, tmp_path):
    with pytest.raises(NumericsError, match=r"policy_loss: NaN at update 3 \(epoch 1, minibatch 1\)"):
        proxrl.train(out=str(tmp_path / "r"), **KW)
    last = checkpoint.latest(tmp_path / "r" / "checkpoints")
    tensors, state = checkpoint.load(last)
    assert state["update"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())
    assert proxrl.evaluate(tmp_path / "r", episodes=2)["episodes"] == 2  # still loads and acts


def test_nan_skip_is_logged_and_undone(nan_at_update_3, tmp_path, capsys):
    res = proxrl.train(out=str(tmp_path / "s"), on_nonfinite="skip", **KW)
    lines = [json.loads(l) for l in open(res.run_dir / "metrics.jsonl")]
    assert len(lines) == 5
    assert "policy_loss: NaN" in lines[2]["skipped"] and "skipped" not in lines[1]
    assert lines[2]["approx_kl"] == 0.0  # weights restored to θ_old: the policy did not move
    assert "update 3 skipped" in capsys.readouterr().err
    for name, p in proxrl.load(res.run_dir).policy.named_parameters():
        assert torch.isfinite(p).all(), name
