"""Every CLI command through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "proxrl", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_train_eval_plot(tmp_path):
    out = tmp_path / "run"
    p = run("train", "--env", "CartPole-v1", "--algo", "ppo-clip", "--steps", "2048", "--seed", "2",
            "--num-envs", "4", "--out", str(out))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["steps"] == 2048
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "CartPole-v1/ppo-clip" and cfg["num_envs"] == 4 and cfg["num_steps"] == 64
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2048 // (4 * 64)
    p = run("eval", str(out), "--episodes", "3", "--seed", "1")
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert set(ev) == {"mean_return", "std_return", "episodes"} and ev["episodes"] == 3
    p = run("plot", str(out), "--out", str(tmp_path / "c.png"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_ladder(tmp_path):
    p = run("ladder", "--env", "CartPole-v1", "--seeds", "2", "--steps", "2048", "--algos", "is-pg", "ppo-clip", "trpo",
            "--workers", "1", "--eval-episodes", "2", "--out", str(tmp_path / "l"))
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "l" / "ladder.md").read_text()
    for algo in ("`is-pg`", "`ppo-clip`", "`trpo`"):
        assert algo in md
    assert (tmp_path / "l" / "ladder.png").stat().st_size > 1000


@pytest.mark.parametrize("args,field", [
    (["train", "--steps", "-5"], "steps"),
    (["train", "--env", "NoSuchEnv-v9"], "env"),
    (["train", "--gamma", "1.5"], "gamma"),
    (["train", "--algo", "ppo3"], "algo"),
    (["train", "--preset", "Nope"], "preset"),
    (["eval", "/nonexistent/run"], "run_dir"),
    (["frobnicate"], "command"),
])
def test_bad_input_is_one_line_exit_2(args, field):
    p = run(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    err = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and field in err[0], p.stderr


def test_help_lists_fields():
    p = run("train", "--help")
    assert p.returncode == 0
    for opt in ("--num-envs", "--gae-lambda", "--clip-coef", "--max-kl", "--preset"):
        assert opt in p.stdout
