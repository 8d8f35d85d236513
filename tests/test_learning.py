"""Learning acceptance criteria of issue 2 (slow: minutes each on 2 cores; not run in CI).

Each test trains seeds 1..5 with the automatic preset and ``steps`` = the criterion's budget, evaluates
the final policy like ``proxrl eval DIR --episodes 20`` (deterministic actions), and asserts that at
least 4 of the 5 seeds reach the threshold. Criteria and thresholds are shared with
``benchmarks/learning.py`` so the test and the recorded figures cannot drift apart.

    PYTHONPATH=src python -m pytest tests/test_learning.py -m slow
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

# benchmarks/learning.py is imported as the module `learning` (on sys.path, so worker processes, which
# receive the parent's sys.path, can unpickle learning.run_one under fork and spawn alike)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learning  # noqa: E402

SEEDS = [1, 2, 3, 4, 5]


def _run_criterion(name: str, tmp_path: Path) -> list[dict]:
    crit = learning.CRITERIA[name]
    with ProcessPoolExecutor(max_workers=2) as pool:
        futs = [pool.submit(learning.run_one, crit, s, {}, str(tmp_path)) for s in SEEDS]
        return [f.result() for f in futs]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(learning.CRITERIA))
def test_learning_threshold(name: str, tmp_path: Path) -> None:
    crit = learning.CRITERIA[name]
    runs = _run_criterion(name, tmp_path)
    passed = [r for r in runs if r["eval_mean"] >= crit.threshold]
    summary = ", ".join(f"s{r['seed']}={r['eval_mean']:.1f}" for r in runs)
    assert len(runs) == 5
    assert all(r["env_steps"] <= crit.steps for r in runs), "a run used more env steps than its budget"
    assert len(passed) >= crit.need, (
        f"{crit.algo} on {crit.env}: {len(passed)}/5 seeds reached {crit.threshold} within {crit.steps} steps "
        f"(need {crit.need}): {summary}")


@pytest.mark.slow
@pytest.mark.parametrize("env,steps", [("Acrobot-v1", 3 * 16 * 256), ("LunarLander-v3", 2 * 16 * 1024)])
def test_zoo_presets_run(env: str, steps: int, tmp_path: Path) -> None:
    """The Acrobot and LunarLander ppo-clip presets run a few updates and evaluate without error."""
    import math

    import proxrl

    res = proxrl.train(env=env, algo="ppo-clip", steps=steps, seed=1, out=str(tmp_path / "run"), progress="off")
    assert res.config.preset == f"{env}/ppo-clip"
    assert len(res.metrics) == steps // res.config.batch_size >= 2
    assert all(m["policy_loss"] is not None and math.isfinite(m["policy_loss"]) for m in res.metrics)
    ev = proxrl.evaluate(tmp_path / "run", episodes=2)
    assert math.isfinite(ev["mean_return"])
