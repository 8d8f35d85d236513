"""Nothing read from a run directory decides which code runs: a resume never imports a reward that is not
named on the command line (or passed by the caller); a planted ``state.json`` naming a payload file is
refused with one line and the payload never runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "proxrl", "rlhf", "ppo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.tiny import make_tiny

    tmp = tmp_path_factory.mktemp("sec")
    make_tiny(tmp / "model", seed=0)
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"p {i}"} for i in range(6)])
    (tmp / "reward.py").write_text("def r(prompts, responses):\n    return [len(x) / 6 for x in responses]\n")
    p = _cli(tmp, "--policy", str(tmp / "model"), "--reward", f"{tmp / 'reward.py'}:r", "--prompts",
             str(tmp / "prompts.jsonl"), "--out", str(tmp / "run"), "--updates", "1", "--batch-size", "2",
             "--num-minibatches", "1", "--micro-batch-size", "2", "--response-length", "3", "--eval-prompts", "1",
             "--chat-template", "off", "--lora-r", "2")
    assert p.returncode == 0, p.stderr
    return tmp


def _plant(tmp: Path, marker: Path) -> Path:
    """A copy of the run whose checkpoint names a payload file as its reward."""
    import shutil

    run = tmp / f"planted-{marker.name}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(tmp / "run", run)
    payload = tmp / f"payload_{marker.name}.py"
    payload.write_text(f"open({str(marker)!r}, 'w').write('pwned')\ndef r(p, rs):\n    return [0.0] * len(rs)\n")
    for state in (run / "checkpoints").glob("ckpt-*/state.json"):
        obj = json.loads(state.read_text())
        obj["config"]["reward"] = f"{payload}:r"
        obj["config"]["updates"] = 3
        state.write_text(json.dumps(obj))
    return run


def test_planted_reward_in_state_json_is_refused_and_never_runs(stopped_run):
    marker = stopped_run / "PWNED-a"
    run = _plant(stopped_run, marker)
    p = _cli(stopped_run, "--resume", str(run))
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "never imported from a run directory" in lines[0] and "--reward" in lines[0]
    assert not marker.exists()


def test_resume_with_another_reward_than_the_run_had_is_refused(stopped_run):
    marker = stopped_run / "PWNED-b"
    run = _plant(stopped_run, marker)
    p = _cli(stopped_run, "--resume", str(run), "--reward", f"{stopped_run / 'reward.py'}:r")
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "pass the same reward" in lines[0], p.stderr
    assert not marker.exists()


def test_resume_with_the_reward_named_on_the_command_line_runs(stopped_run):
    import shutil

    run = stopped_run / "extend"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(stopped_run / "run", run)
    p = _cli(stopped_run, "--resume", str(run), "--reward", f"{stopped_run / 'reward.py'}:r")
    assert p.returncode == 0, p.stderr
