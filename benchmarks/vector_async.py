"""Gymnasium's async vector env against the sync one for a MuJoCo env: env steps per second of a whole
``proxrl train`` run (rollouts and updates) with ``--vectorization sync`` and ``async``, the same preset, seed
and envs, fresh processes, interleaved repetitions, medians.

    python benchmarks/vector_async.py                               # HalfCheetah-v5 trpo, 2 and 4 envs, 3 reps
    python benchmarks/vector_async.py --env CartPole-v1 --algo ppo-clip --envs 2 --steps 2048 --reps 1 --tag smoke

Results: benchmarks/results/vector_async{-TAG}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, command_line, machine


def run(env: str, algo: str, envs: int, mode: str, steps: int, out: Path) -> float:
    """Env steps per second of one run (the last metrics line's ``sps``)."""
    cmd = [sys.executable, "-m", "proxrl", "train", "--env", env, "--algo", algo, "--num-envs", str(envs),
           "--vectorization", mode, "--steps", str(steps), "--seed", "1", "--progress", "off",
           "--checkpoint-every", "0", "--out", str(out)]
    pyenv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=pyenv, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{mode} × {envs} failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["sps"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--algo", default="trpo")
    ap.add_argument("--envs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=20480)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for n in args.envs:
                for mode in ("sync", "async"):  # interleaved: both see the same machine load
                    sps = run(args.env, args.algo, n, mode, args.steps, Path(tmp) / f"r{rep}-{n}-{mode}")
                    res.setdefault(f"{n}-{mode}", []).append(sps)
                    print(f"rep {rep} {n} envs {mode}: {sps:.0f} steps/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    summary = {"command": command_line("vector_async.py", argv if argv is not None else sys.argv[1:]), "machine": machine(None), "env": args.env, "algo": args.algo,
               "steps": args.steps, "sps": res, "median_sps": med,
               "async_over_sync": {n: med[f"{n}-async"] / med[f"{n}-sync"] for n in args.envs}}
    stem = RESULTS / ("vector_async" + (f"-{args.tag}" if args.tag else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# Async vs sync vector env: {args.env} {args.algo}, {args.steps} steps, 1 thread per process", "",
          f"Command: `{summary['command']}`", "", "| envs | sync steps/s | async steps/s | async / sync (median) |",
          "|---|---|---|---|"]
    for n in args.envs:
        md.append(f"| {n} | {' / '.join(f'{x:.0f}' for x in res[f'{n}-sync'])} | "
                  f"{' / '.join(f'{x:.0f}' for x in res[f'{n}-async'])} | **{summary['async_over_sync'][n]:.2f}** |")
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    print(json.dumps({"async_over_sync": summary["async_over_sync"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
