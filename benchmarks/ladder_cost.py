"""Target 6 — what each rung of the ladder costs on CartPole-v1 (optionally HalfCheetah-v5): wall-clock per
update split into rollout (collect) and optimisation (update + diagnostics), and per env step.

    python benchmarks/ladder_cost.py                         # every rung, its preset, 3 repetitions
    python benchmarks/ladder_cost.py --env HalfCheetah-v5 --steps 20480

Two settings per rung: ``preset`` (the rung as proxrl trains it, its tuned batch) and ``same-batch``
(every rung at 8 envs × 128 steps with the rung's own defaults for epochs, minibatches and critic, so per-update costs
compare like for like). Rungs run interleaved within each repetition in one process (torch threads = 1);
the medians over repetitions go to benchmarks/results/ladder_cost.json|md|png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _common import command_line, RESULTS, machine, median, write_json

LADDER = ["pg", "pg-baseline", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo", "npg"]
SAME_BATCH = dict(preset="none", num_envs=8, num_steps=128)  # the rung's own epochs/minibatches/critic defaults


def measure(env: str, algo: str, steps: int, seed: int, extra: dict) -> dict:
    """Train with timers around Runner.collect and the update functions (benchmark-local instrumentation)."""
    import proxrl
    import proxrl.gym.rollout as rollout
    import proxrl.gym.trainer as trainer

    timers = {"collect": 0.0, "update": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t
        return wrapper

    orig = (rollout.Runner.collect, trainer.sgd_update, trainer.trust_region_update, trainer.post_update_diagnostics)
    rollout.Runner.collect = timed(orig[0], "collect")
    trainer.sgd_update = timed(orig[1], "update")
    trainer.trust_region_update = timed(orig[2], "update")
    trainer.post_update_diagnostics = timed(orig[3], "update")
    try:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            r = proxrl.train(env=env, algo=algo, steps=steps, seed=seed, out=out, progress="off", torch_threads=1,
                             **extra)
            wall = time.perf_counter() - t
    finally:
        rollout.Runner.collect, trainer.sgd_update, trainer.trust_region_update, trainer.post_update_diagnostics = orig
    n_up, n_steps = len(r.metrics), r.metrics[-1]["step"]
    return {"updates": n_up, "env_steps": n_steps, "batch": r.config.batch_size, "wall": wall,
            "collect_ms_per_update": 1e3 * timers["collect"] / n_up, "update_ms_per_update": 1e3 * timers["update"] / n_up,
            "us_per_env_step": 1e6 * wall / n_steps, "update_us_per_sample": 1e6 * timers["update"] / n_steps,
            "final_return": r.final_return}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--steps", type=int, default=16_384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rungs", nargs="*", default=LADDER)
    ap.add_argument("--settings", nargs="*", default=["preset", "same-batch"])
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    import torch

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)  # torch._dynamo import, outside the timers
    info = machine(None)
    runs: dict = {s: {a: [] for a in args.rungs} for s in args.settings}
    for rep in range(1, args.reps + 1):
        for setting in args.settings:
            for algo in args.rungs:
                extra = {} if setting == "preset" else dict(SAME_BATCH)
                steps = max(args.steps, 8 * 500 if setting == "preset" and algo.startswith("pg") else 0)
                r = measure(args.env, algo, steps, rep, extra)
                runs[setting][algo].append(r)
                print(f"rep {rep} {setting:10s} {algo:12s} batch {r['batch']:5d}  collect {r['collect_ms_per_update']:8.1f} ms"
                      f"  update {r['update_ms_per_update']:8.1f} ms  {r['us_per_env_step']:7.1f} µs/env step", flush=True)
    info["loadavg_end"] = os.getloadavg()
    keys = ["batch", "collect_ms_per_update", "update_ms_per_update", "us_per_env_step", "update_us_per_sample"]
    summary = {s: {a: {k: median([r[k] for r in rs]) for k in keys} for a, rs in by.items()} for s, by in runs.items()}
    for s, by in summary.items():
        ref = by.get("ppo-clip")
        for a, m in by.items():
            if ref:
                m["update_vs_ppo_clip"] = m["update_ms_per_update"] / ref["update_ms_per_update"]
                m["env_step_vs_ppo_clip"] = m["us_per_env_step"] / ref["us_per_env_step"]
    tag = f"-{args.tag}" if args.tag else ""
    env_tag = "" if args.env == "CartPole-v1" else "-" + args.env.split("-")[0].lower()
    data = {"command": command_line("ladder_cost.py", argv or sys.argv[1:]), "machine": info,
            "settings": vars(args), "runs": runs, "summary": summary}
    write_json(f"ladder_cost{env_tag}{tag}.json", data)
    lines = [f"command: `{data['command']}`  ", f"machine: {info}", ""]
    for s, by in summary.items():
        lines += [f"**{s}** ({args.env}, median of {args.reps})", "",
                  "| rung | batch | collect ms/update | update ms/update | µs per env step (whole loop) | update µs per sample | update × ppo-clip | env step × ppo-clip |",
                  "|---|---|---|---|---|---|---|---|"]
        for a, m in by.items():
            lines.append(f"| {a} | {m['batch']:.0f} | {m['collect_ms_per_update']:.1f} | {m['update_ms_per_update']:.1f} | "
                         f"{m['us_per_env_step']:.1f} | {m['update_us_per_sample']:.1f} | {m.get('update_vs_ppo_clip', float('nan')):.2f} | "
                         f"{m.get('env_step_vs_ppo_clip', float('nan')):.2f} |")
        lines.append("")
    (RESULTS / f"ladder_cost{env_tag}{tag}.md").write_text("\n".join(lines) + "\n")
    plot(RESULTS / f"ladder_cost{env_tag}{tag}.png", summary, args.env)
    return 0


def plot(path, summary, env) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    for ax, (s, by) in zip(axes[0], summary.items()):
        names = list(by)
        c = [by[a]["collect_ms_per_update"] for a in names]
        u = [by[a]["update_ms_per_update"] for a in names]
        ax.bar(names, c, label="collect")
        ax.bar(names, u, bottom=c, label="update")
        ax.set_title(f"{env}, {s}: ms per update (batch " + ("per preset" if s == "preset" else "1024") + ")")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
