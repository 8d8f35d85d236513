"""Smoke test of the peer benchmarks (issue 4): every script runs end to end with tiny budgets and
``--no-peer`` (CI has no peers' venv; nothing is installed), writing its results to a temporary folder.
The full runs are documented in BENCHMARKS.md and are not part of CI; the three longest smoke tests are
behind the ``slow`` marker (``pytest -m slow tests/test_benchmarks_smoke.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, args: list[str], out: Path) -> None:
    env = dict(os.environ, PROXRL_BENCH_RESULTS=str(out))
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cartpole_solve_smoke(tmp_path: Path) -> None:
    _run("cartpole_solve.py", ["--no-peer", "--seeds", "1", "--budget", "512", "--eval-every", "256",
                               "--episodes", "2", "--threshold", "5", "--tag", "smoke"], tmp_path)
    data = json.loads((tmp_path / "cartpole_solve-smoke.json").read_text())
    run = data["runs"]["proxrl"][0]
    # evaluation happens after the first update that crosses --eval-every (one rollout of the preset)
    first_eval = run["curve"][0][0]
    assert 256 <= first_eval <= 512 and run["solved"] is not None and run["solved"]["steps"] == first_eval
    assert (tmp_path / "cartpole_solve-smoke.md").exists()


def test_throughput_smoke(tmp_path: Path) -> None:
    _run("throughput.py", ["--no-peer", "--reps", "1", "--steps", "1024", "--tag", "smoke"], tmp_path)
    data = json.loads((tmp_path / "throughput-smoke.json").read_text())
    assert data["runs"]["proxrl"][0]["steps"] == 1024 and data["summary"]["proxrl"]["median_sps"] > 0


def test_vector_async_smoke(tmp_path: Path) -> None:
    _run("vector_async.py", ["--env", "CartPole-v1", "--algo", "ppo-clip", "--envs", "2", "--steps", "1024",
                             "--reps", "1", "--tag", "smoke"], tmp_path)
    data = json.loads((tmp_path / "vector_async-smoke.json").read_text())
    assert data["sps"]["2-sync"][0] > 0 and data["sps"]["2-async"][0] > 0 and "2" in map(str, data["async_over_sync"])


def test_ladder_cost_smoke(tmp_path: Path) -> None:
    _run("ladder_cost.py", ["--reps", "1", "--steps", "1024", "--rungs", "pg", "ppo-clip", "trpo",
                            "--settings", "same-batch", "--tag", "smoke"], tmp_path)
    data = json.loads((tmp_path / "ladder_cost-smoke.json").read_text())
    s = data["summary"]["same-batch"]
    assert set(s) == {"pg", "ppo-clip", "trpo"} and s["ppo-clip"]["update_vs_ppo_clip"] == 1.0


@pytest.mark.slow  # CI time (~15-30 s each); run with -m slow
def test_learning_comparison_smoke(tmp_path: Path) -> None:
    """benchmarks/halfcheetah.py end to end on CartPole (CI has no MuJoCo), then --resume
    keeps the finished runs and adds only the missing ones."""
    args = ["--no-peer", "--env", "CartPole-v1", "--steps", "1024", "--seeds", "1", "--episodes", "2",
            "--curve-every", "256", "--tag", "smoke", "--jobs", "1"]
    _run("halfcheetah.py", args, tmp_path)
    data = json.loads((tmp_path / "halfcheetah-smoke.json").read_text())
    assert set(data["runs"]) == {"proxrl-ppo-clip", "proxrl-trpo"}
    run = data["runs"]["proxrl-ppo-clip"][0]
    assert run["steps"] == 1024 and run["eval_return"] > 0 and "error" not in run
    _run("halfcheetah.py", args[:6] + ["2"] + args[7:] + ["--resume"], tmp_path)
    data = json.loads((tmp_path / "halfcheetah-smoke.json").read_text())
    assert sorted(r["seed"] for r in data["runs"]["proxrl-trpo"]) == [1, 2]
    assert data["runs"]["proxrl-ppo-clip"][0] == run  # kept, not re-run
    assert len(data["commands"]) == 2


def test_rlhf_update_timing_smoke(tmp_path: Path) -> None:
    _run("rlhf_vs_trl.py", ["--no-peer", "--reps", "1", "--updates", "2", "--batch-size", "8",
                            "--response-length", "4", "--epochs", "1", "--num-minibatches", "2",
                            "--micro-batch-size", "4", "--threads", "1", "--tag", "smoke"], tmp_path)
    data = json.loads((tmp_path / "rlhf_vs_trl-smoke.json").read_text())
    r = data["runs"]["proxrl"][0]
    assert len(r["update_times"]) == 2 and all(g < u for g, u in zip(r["generation_times"], r["update_times"]))
    assert data["summary"]["proxrl"]["median_update"] > 0


def test_lm_flops_smoke(tmp_path: Path) -> None:
    _run("lm_flops.py", ["--tiny", "--modes", "lora", "--updates", "1", "--batch-size", "4", "--micro-batch-size", "2",
                         "--response-length", "4", "--peak-n", "256", "--tag", "smoke"], tmp_path)
    data = json.loads((tmp_path / "lm_flops-smoke.json").read_text())
    row = data["results"]["lora"]["rows"][-1]
    # counted FLOPs: training (forward + backward) costs more than the rollout forwards of the same tokens
    assert row["training"]["flops"] > row["forwards"]["flops"] > 0 and row["generation"]["flops"] > 0
    assert 0 < data["results"]["lora"]["summary"]["update_total"]["median_fraction"] < 1


def test_peer_runs_are_opt_in(tmp_path: Path) -> None:
    """Without --no-peer and without a peers' venv the scripts stop with the set-up command; never install."""
    env = dict(os.environ, PROXRL_BENCH_RESULTS=str(tmp_path), PROXRL_PEERS_VENV=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--reps", "1", "--steps", "512"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "setup_peers.sh" in proc.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.slow  # CI time (~15-30 s each); run with -m slow
def test_scale_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    _run("scale.py", ["--tiny", "--reps", "1", "--updates", "2", "--batch", "4", "--response-length", "4",
                      "--out", str(out)], tmp_path)
    data = json.loads(Path(str(out) + ".json").read_text())
    assert data["median_ratio"] > 0 and set(data["median_tokens_per_s"]) == {"1", "2"}


@pytest.mark.slow  # CI time (~15-30 s each); run with -m slow
def test_lm_memory_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mem"
    _run("lm_memory.py", ["--tiny", "--reps", "1", "--batch", "2", "--threads", "1", "--out", str(out)], tmp_path)
    data = json.loads(Path(str(out) + ".json").read_text())
    assert data["sampling_ratio"] > 0 and data["peak_ratio_lora"] > 0
