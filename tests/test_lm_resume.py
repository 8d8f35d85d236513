"""RLHF PPO never loses a run: a run killed (SIGKILL) at a random update and resumed with ``--resume`` equals
the uninterrupted run of the same seed bit for bit — every metrics line (wall-clock fields aside) and every
tensor of the final checkpoint (weights, Adam state, RNGs); SIGTERM finishes the update, checkpoints,
exits 143 and resumes to the same result; the same seed twice gives the same run.

Everything goes through the CLI in subprocesses on a tiny random llama with a Python reward function that
also draws from Python's and numpy's RNGs (so their checkpointing is exercised). The six processes run in
three concurrent waves (one torch thread each) to stay well under a minute and a half on two cores."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from safetensors.torch import load_file

from proxrl.run import checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
WALL = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time")
UPDATES = 8
REWARD = '''
import os, random, time
import numpy as np

def share_of_a(prompts, responses):
    time.sleep(float(os.environ.get("SLOW_REWARD", "0")))  # slows only the runs we interrupt
    return [r.count("a") / max(len(r), 1) + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
            for r in responses]
'''


def start(tmp: Path, *args: str, slow: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               SLOW_REWARD=str(slow))
    return subprocess.Popen([sys.executable, "-m", "proxrl", "rlhf", "ppo", *args], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def train_args(tmp: Path, out: Path) -> list[str]:
    return ["--policy", str(tmp / "model"), "--reward", f"{tmp / 'reward.py'}:share_of_a", "--prompts",
            str(tmp / "prompts.jsonl"), "--out", str(out), "--updates", str(UPDATES), "--batch-size", "4",
            "--num-minibatches", "2", "--micro-batch-size", "1", "--update-epochs", "2", "--response-length", "6",
            "--eval-prompts", "2", "--checkpoint-every", "2", "--chat-template", "off", "--finetune", "lora",
            "--lora-r", "2", "--seed", "3", "--lr", "3e-3", "--temperature", "1.0"]


def lines(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in WALL} for l in open(run / "metrics.jsonl")]


def assert_identical(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == UPDATES
    for i, (x, y) in enumerate(zip(ma, mb)):
        assert x == y, f"metrics line {i + 1} differs: {[k for k in x if x[k] != y.get(k)]}"
    ta = load_file(str(checkpoint.latest(a / "checkpoints") / "tensors.safetensors"))
    tb = load_file(str(checkpoint.latest(b / "checkpoints") / "tensors.safetensors"))
    assert ta.keys() == tb.keys()
    assert any(k.startswith("optimizer/") for k in ta) and "rng/torch" in ta and "rng/shuffle" in ta
    assert any(".lora_" in k for k in ta) and any("value_head" in k for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]
    assert (a / "samples.md").read_text() == (b / "samples.md").read_text()
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert {k: v for k, v in sa.items() if k != "wall_time"} == {k: v for k, v in sb.items() if k != "wall_time"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Wave 1: the reference run, its same-seed repeat, a run SIGKILLed at a random update and one SIGTERMed;
    wave 2: both interrupted runs resumed."""
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.tiny import make_tiny

    tmp = tmp_path_factory.mktemp("lm_resume")
    make_tiny(tmp / "model", arch="llama", layers=1, hidden=16, seed=0)
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"say {i}:"} for i in range(11)])
    (tmp / "reward.py").write_text(REWARD)
    r = {name: tmp / name for name in ("ref", "repeat", "killed", "termed")}
    procs = {name: start(tmp, *train_args(tmp, path), slow=0.3 if name in ("killed", "termed") else 0.0)
             for name, path in r.items()}
    # SIGKILL after a random update past the first checkpoint (update 2), possibly mid-way to the next one,
    # so the resumed run must also drop metrics lines written after its checkpoint
    kill_after = random.randint(3, UPDATES - 2)
    pending = {"killed": (kill_after, signal.SIGKILL), "termed": (3, signal.SIGTERM)}
    t0 = time.time()
    while pending:
        for name, (n, sig) in list(pending.items()):
            if lines(r[name]) >= n:
                procs[name].send_signal(sig)
                del pending[name]
            elif procs[name].poll() is not None:
                raise AssertionError(f"{name} ended early: {procs[name].stderr.read()[-2000:]}")
        assert time.time() - t0 < 300, "timeout waiting for metrics lines"
        time.sleep(0.02)
    out = {name: finish(p) for name, p in procs.items()}
    info = {"kill_after": kill_after, "killed_lines": lines(r["killed"]),
            "killed_ckpt": checkpoint.latest(r["killed"] / "checkpoints").name,
            "termed_lines": lines(r["termed"]), "termed_ckpt": checkpoint.latest(r["termed"] / "checkpoints").name}
    resumes = {name: start(tmp, "--resume", str(r[name]), "--reward", f"{tmp / 'reward.py'}:share_of_a")
               for name in ("killed", "termed")}
    out.update({f"{name}-resume": finish(p) for name, p in resumes.items()})
    return r, out, info


def test_same_seed_twice_is_bit_identical(runs):
    r, out, _ = runs
    assert out["ref"][0] == 0, out["ref"][1][-2000:]
    assert out["repeat"][0] == 0, out["repeat"][1][-2000:]
    assert_identical(r["ref"], r["repeat"])


def test_sigkill_at_a_random_update_then_resume_is_bit_identical(runs):
    r, out, info = runs
    assert out["killed"][0] == -signal.SIGKILL
    assert info["killed_ckpt"] < f"ckpt-{UPDATES:012d}", info  # really interrupted before the end
    assert out["killed-resume"][0] == 0, out["killed-resume"][1][-2000:]
    assert_identical(r["ref"], r["killed"])


def test_sigterm_finishes_the_update_checkpoints_exits_143_and_resumes_identically(runs):
    r, out, info = runs
    code, err = out["termed"]
    assert code == 143, err[-2000:]
    assert "resume with: proxrl rlhf ppo --resume" in err and "Traceback" not in err
    stopped_at = info["termed_lines"]
    assert 3 <= stopped_at < UPDATES and info["termed_ckpt"] == f"ckpt-{stopped_at:012d}", info
    assert out["termed-resume"][0] == 0, out["termed-resume"][1][-2000:]
    assert_identical(r["ref"], r["termed"])
