"""Target 1 — CartPole-v1 time to solve: proxrl ``ppo-clip`` (its preset) vs Stable-Baselines3 PPO with the
rl-zoo hyperparameters, seeds interleaved in the same run, medians over seeds.

    python benchmarks/cartpole_solve.py                      # 5 seeds, peers' venv from setup_peers.sh
    python benchmarks/cartpole_solve.py --setup-peers        # create the peers' venv first
    python benchmarks/cartpole_solve.py --sb3-default-threads  # also SB3 with torch's default threads

Both sides: training in a fresh process, torch threads = 1, evaluation every ``--eval-every`` env steps
right after an update (20 deterministic episodes, seed 12345, exactly ``proxrl eval DIR --episodes 20``),
stop at mean ≥ 475. Time to solve = wall-clock from building the model/envs to the update that produced the
solving policy, evaluation time EXCLUDED (also reported with it). The LR/clip schedules run over the zoo's
1e5-step budget on both sides. Results: benchmarks/results/cartpole_solve.json|md|png.
"""

from __future__ import annotations

import argparse
import sys

from _common import command_line, add_peer_args, machine, median, peer_python, run_worker, write_json, RESULTS

SB3_ZOO = dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
               learning_rate="lin_1e-3", clip_range="lin_0.2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=100_000, help="schedule length and step cap (zoo: 1e5)")
    ap.add_argument("--eval-every", type=int, default=2048)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=475.0)
    ap.add_argument("--sb3-default-threads", action="store_true", help="add an arm: SB3 with torch's default threads")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. smoke)")
    add_peer_args(ap)
    args = ap.parse_args(argv)
    peer = peer_python(args)
    base = dict(kind="solve", env="CartPole-v1", budget=args.budget, eval_every=args.eval_every,
                episodes=args.episodes, threshold=args.threshold)
    arms = [("proxrl", sys.executable, "proxrl_worker", dict(algo="ppo-clip", threads=1))]
    if peer:
        arms.append(("sb3", peer, "sb3_worker", dict(sb3=SB3_ZOO, threads=1)))
        if args.sb3_default_threads:
            arms.append(("sb3-default-threads", peer, "sb3_worker", dict(sb3=SB3_ZOO, threads=None)))
    info = machine(peer)
    runs = {name: [] for name, *_ in arms}
    for seed in range(1, args.seeds + 1):
        for name, py, worker, extra in arms:  # interleaved: each seed runs every arm back to back
            r = run_worker(py, worker, dict(base, seed=seed, **extra))
            r["seed"] = seed
            runs[name].append(r)
            s = r["solved"]
            print(f"seed {seed} {name:20s} " + (f"solved at {s['steps']:6d} steps in {s['time']:7.2f} s "
                  f"({s['time_with_eval']:.2f} s with eval)" if s else "not solved within budget"), flush=True)
    import os
    info["loadavg_end"] = os.getloadavg()
    summary = {}
    for name, rs in runs.items():
        solved = [r["solved"] for r in rs]
        summary[name] = {
            "solved": sum(s is not None for s in solved), "seeds": len(rs),
            "median_time": median([s["time"] if s else None for s in solved]),
            "median_time_with_eval": median([s["time_with_eval"] if s else None for s in solved]),
            "median_steps": median([s["steps"] if s else None for s in solved]),
        }
    if "sb3" in summary and summary["sb3"]["median_time"] and summary["proxrl"]["median_time"]:
        summary["ratio_time"] = summary["proxrl"]["median_time"] / summary["sb3"]["median_time"]
        summary["ratio_time_with_eval"] = (summary["proxrl"]["median_time_with_eval"]
                                           / summary["sb3"]["median_time_with_eval"])
        summary["target_met"] = summary["ratio_time"] <= 0.25
    tag = f"-{args.tag}" if args.tag else ""
    data = {"command": command_line("cartpole_solve.py", argv or sys.argv[1:]), "machine": info,
            "settings": vars(args) | {"sb3": SB3_ZOO}, "runs": runs, "summary": summary}
    write_json(f"cartpole_solve{tag}.json", data)
    write_md(RESULTS / f"cartpole_solve{tag}.md", data)
    if not args.no_peer or args.tag:
        plot(RESULTS / f"cartpole_solve{tag}.png", runs)
    print(json_summary(summary))
    return 0


def json_summary(summary) -> str:
    import json

    return json.dumps(summary, indent=1)


def write_md(path, data) -> None:
    s, runs = data["summary"], data["runs"]
    lines = [f"command: `{data['command']}`  ", f"machine: {data['machine']}", "",
             "| seed | " + " | ".join(f"{n} steps | {n} s | {n} s incl. eval" for n in runs) + " |",
             "|---|" + "---|---|---|" * len(runs)]
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    for seed in seeds:
        cells = []
        for n, rs in runs.items():
            r = next(r for r in rs if r["seed"] == seed)["solved"]
            cells += [str(r["steps"]), f"{r['time']:.2f}", f"{r['time_with_eval']:.2f}"] if r else ["—", "—", "—"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    cells = []
    for n in runs:
        m = s[n]
        fmt = lambda v, f: (f % v) if v is not None else "—"
        cells += [fmt(m["median_steps"], "%d"), fmt(m["median_time"], "%.2f"), fmt(m["median_time_with_eval"], "%.2f")]
    lines.append("| **median** | " + " | ".join(cells) + " |")
    if "ratio_time" in s:
        lines += ["", f"ratio proxrl/SB3 (median time, eval excluded): **{s['ratio_time']:.3f}** "
                      f"(target ≤ 0.25: {'met' if s['target_met'] else 'missed'}); "
                      f"eval included: {s['ratio_time_with_eval']:.3f}"]
    path.write_text("\n".join(lines) + "\n")


def plot(path, runs) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"proxrl": "tab:blue", "sb3": "tab:orange", "sb3-default-threads": "tab:red"}
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            c = r["curve"]
            if not c:
                continue
            lab = name if i == 0 else None
            axes[0].plot([p[1] for p in c], [p[2] for p in c], color=colors.get(name), alpha=0.7, label=lab, marker=".")
            axes[1].plot([p[0] for p in c], [p[2] for p in c], color=colors.get(name), alpha=0.7, label=lab, marker=".")
    for ax, xl in zip(axes, ["training wall-clock (s, eval excluded)", "env steps"]):
        ax.axhline(475, ls="--", color="grey")
        ax.set_xlabel(xl)
        ax.set_ylabel("eval mean return (20 episodes)")
        ax.legend()
    fig.suptitle("CartPole-v1 time to solve: proxrl ppo-clip preset vs SB3 PPO (rl-zoo), one curve per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
