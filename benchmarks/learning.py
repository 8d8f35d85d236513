"""Learning acceptance criteria of the gym ladder (issue 2), measured the way a user would check them.

For each criterion: train seeds 1..N through ``proxrl.train`` with ``steps`` = the criterion's budget and
the automatic (env, algo) preset, then ``proxrl.evaluate(run_dir, episodes=20)`` on the final policy
(deterministic actions, the default evaluation seed — exactly ``proxrl eval DIR --episodes 20``). A seed
passes when its mean return ≥ the threshold; a criterion passes when ≥ ``need`` of 5 seeds pass.

    PYTHONPATH=src python benchmarks/learning.py                       # everything, 5 seeds, 2 workers
    PYTHONPATH=src python benchmarks/learning.py --only cartpole-ppo-clip pendulum-ppo-clip
    PYTHONPATH=src python benchmarks/learning.py --only pendulum-ppo-clip --set gamma=0.95 --tag try1

Results go to ``benchmarks/results/learning.json`` and ``learning.md`` (criteria not re-run keep their
previous entry). ``--set`` overrides config fields for a tuning experiment; such runs are written to
``learning-<tag>.json|md`` instead, never over the recorded results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_EPISODES = 20


@dataclass(frozen=True)
class Criterion:
    name: str
    env: str
    algo: str
    steps: int
    threshold: float
    need: int = 4  # seeds out of 5 that must reach the threshold


CRITERIA: dict[str, Criterion] = {c.name: c for c in [
    Criterion("cartpole-ppo-clip", "CartPole-v1", "ppo-clip", 50_000, 475.0),
    Criterion("cartpole-ppo-kl", "CartPole-v1", "ppo-kl", 100_000, 475.0),
    Criterion("cartpole-trpo", "CartPole-v1", "trpo", 100_000, 475.0),
    Criterion("cartpole-pg-rtg", "CartPole-v1", "pg-rtg", 200_000, 300.0),
    Criterion("pendulum-ppo-clip", "Pendulum-v1", "ppo-clip", 200_000, -300.0),
]}


def run_one(crit: Criterion, seed: int, overrides: dict[str, Any], out_root: str) -> dict[str, Any]:
    """Train one seed and evaluate its final policy (runs in a worker process)."""
    import proxrl

    out = os.path.join(out_root, f"{crit.name}-s{seed}")
    t0 = time.perf_counter()
    result = proxrl.train(env=crit.env, algo=crit.algo, steps=crit.steps, seed=seed, out=out, progress="off",
                          torch_threads=1, **overrides)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = proxrl.evaluate(out, episodes=EVAL_EPISODES)
    eval_s = time.perf_counter() - t1
    last = result.metrics[-1]
    return {"criterion": crit.name, "seed": seed, "eval_mean": ev["mean_return"], "eval_std": ev["std_return"],
            "passed": ev["mean_return"] >= crit.threshold, "train_seconds": round(train_s, 1),
            "eval_seconds": round(eval_s, 1), "env_steps": last["step"],
            "last_train_return": last["episode_return"], "preset": result.config.preset, "run_dir": out}


def _criterion_summary(crit: Criterion, runs: list[dict[str, Any]], overrides: dict[str, Any]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["seed"])
    passed = sum(r["passed"] for r in runs)
    return {**asdict(crit), "overrides": overrides, "seeds": [r["seed"] for r in runs], "runs": runs,
            "passed": passed, "accepted": passed >= crit.need and len(runs) >= 5,
            "train_seconds_total": round(sum(r["train_seconds"] for r in runs), 1)}


def machine() -> dict[str, Any]:
    import gymnasium
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gymnasium": gymnasium.__version__, "platform": platform.platform()}


def to_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [f"Machine: {m['cpus']} CPU cores, torch {m['torch']}, gymnasium {m['gymnasium']}, Python {m['python']}; "
             f"{data['workers']} worker processes, torch_threads=1. Evaluation: final policy, "
             f"{EVAL_EPISODES} episodes, deterministic actions.", "",
             "| criterion | env | algo | budget | threshold | per-seed eval return (seed 1..) | passed | accepted "
             "| train s per run |", "|---|---|---|---|---|---|---|---|---|"]
    for c in data["criteria"].values():
        rets = ", ".join(f"{r['eval_mean']:.1f}" for r in c["runs"])
        secs = ", ".join(f"{r['train_seconds']:.0f}" for r in c["runs"])
        ov = f" (overrides {json.dumps(c['overrides'])})" if c["overrides"] else ""
        lines.append(f"| {c['name']}{ov} | {c['env']} | {c['algo']} | {c['steps']:,} | {c['threshold']:g} | {rets} "
                     f"| {c['passed']}/{len(c['runs'])} | {'yes' if c['accepted'] else 'NO'} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds 1..N per criterion (default 5)")
    p.add_argument("--only", nargs="+", choices=sorted(CRITERIA), help="run only these criteria")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default and maximum here: 2)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="config overrides for a tuning experiment (JSON values); results go to learning-<tag>.*")
    p.add_argument("--tag", default=None, help="name of an experiment's result files (default: 'exp' with --set)")
    p.add_argument("--keep-runs", default=None, help="keep run directories here (default: a temporary directory)")
    args = p.parse_args(argv)

    overrides: dict[str, Any] = {}
    for item in args.set:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    tag = args.tag or ("exp" if overrides else None)
    stem = f"learning-{tag}" if tag else "learning"
    crits = [CRITERIA[n] for n in (args.only or CRITERIA)]
    seeds = list(range(1, args.seeds + 1))

    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{stem}.json"
    data: dict[str, Any] = {"criteria": {}}
    data.update(machine=machine(), workers=args.workers,
                command="PYTHONPATH=src python benchmarks/learning.py " + " ".join(argv if argv is not None else sys.argv[1:]))

    tmp = None
    out_root = args.keep_runs
    if out_root is None:
        tmp = tempfile.TemporaryDirectory(prefix="proxrl-learning-")
        out_root = tmp.name
    results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in crits}
    jobs = [(c, s) for c in crits for s in seeds]
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futs = {pool.submit(run_one, c, s, overrides, out_root): (c, s) for c, s in jobs}
            for fut in as_completed(futs):
                c, s = futs[fut]
                r = fut.result()
                results[c.name].append(r)
                print(f"{c.name:20s} seed {s}: eval {r['eval_mean']:8.1f} ± {r['eval_std']:6.1f}  "
                      f"{'PASS' if r['passed'] else 'fail'}  train {r['train_seconds']:6.1f}s", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if json_path.exists():  # re-read now: another invocation may have recorded other criteria meanwhile
        data["criteria"] = json.loads(json_path.read_text()).get("criteria", {})
    for c in crits:
        data["criteria"][c.name] = _criterion_summary(c, results[c.name], overrides)
    data["criteria"] = {n: data["criteria"][n] for n in CRITERIA if n in data["criteria"]}
    data["wall_seconds_last_invocation"] = round(time.perf_counter() - t0, 1)

    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md = to_markdown(data)
    (RESULTS / f"{stem}.md").write_text(md)
    print()
    print(md)
    return 0 if all(data["criteria"][c.name]["accepted"] for c in crits) else 1


if __name__ == "__main__":
    sys.exit(main())
