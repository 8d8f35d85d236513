"""Target 3 — MuJoCo (HalfCheetah-v5), 1M env steps, 3 seeds: proxrl ``ppo-clip`` and ``trpo`` (their presets)
vs Stable-Baselines3 PPO and sb3-contrib TRPO with the rl-zoo hyperparameters; final return and wall time.

    python benchmarks/halfcheetah.py                          # 3 seeds × 4 arms × 1M steps, 2 runs at a time
    python benchmarks/halfcheetah.py --algos ppo --seeds 1    # one comparison
    python benchmarks/halfcheetah.py --no-peer --steps 2048   # proxrl alone (CI smoke test)

Every run is a fresh process with torch threads = 1; ``--jobs`` runs go at once (default 2 = the cores of
the reference machine), queued so that each proxrl run and its peer run for the same seed start together
and see the same load. Final return = deterministic evaluation over ``--episodes`` episodes (seed 12345)
with the run's frozen observation normalisation; wall time = env and model construction + training.
Results are written after every finished run (a long benchmark never loses what it measured):
benchmarks/results/halfcheetah[-TAG].json|md|png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from _common import command_line, add_peer_args, machine, median, peer_python, run_worker, write_json, RESULTS

# rl-baselines3-zoo hyperparams/ppo.yml and trpo.yml, HalfCheetah-v4 (the v5 env has the same dynamics)
SB3_ZOO = {
    "ppo": dict(algo="ppo", n_envs=1, normalize=True, batch_size=64, n_steps=512, gamma=0.98,
                learning_rate=2.0633e-05, ent_coef=0.000401762, clip_range=0.1, n_epochs=20, gae_lambda=0.92,
                max_grad_norm=0.8, vf_coef=0.58096,
                policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation_fn="relu",
                                   net_arch=dict(pi=[256, 256], vf=[256, 256]))),
    "trpo": dict(algo="trpo", n_envs=2, normalize=True, batch_size=128, n_steps=1024, gamma=0.99, gae_lambda=0.95,
                 sub_sampling_factor=1, cg_max_steps=25, cg_damping=0.1, n_critic_updates=20, learning_rate=1e-3,
                 target_kl=0.04),
}
PROXRL_ALGO = {"ppo": "ppo-clip", "trpo": "trpo"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--algos", nargs="+", default=["ppo", "trpo"], choices=sorted(SB3_ZOO))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one torch thread)")
    ap.add_argument("--curve-every", type=int, default=10_000)
    ap.add_argument("--tag", default="")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in the results file and do only the missing (arm, seed) runs")
    add_peer_args(ap)
    args = ap.parse_args(argv)
    peer = peer_python(args)
    tag = f"-{args.tag}" if args.tag else ""
    base = dict(kind="learn", env=args.env, steps=args.steps, episodes=args.episodes, threads=1,
                curve_every=args.curve_every)
    jobs = []
    for algo in args.algos:
        for seed in range(1, args.seeds + 1):
            jobs.append((f"proxrl-{PROXRL_ALGO[algo]}", algo, sys.executable, "proxrl_worker",
                         dict(base, seed=seed, algo=PROXRL_ALGO[algo])))
            if peer:
                jobs.append((f"sb3-{algo}", algo, peer, "sb3_worker", dict(base, seed=seed, sb3=SB3_ZOO[algo])))
    info = machine(peer)
    runs: dict[str, list] = {}
    lock = threading.Lock()
    command = command_line("halfcheetah.py", argv if argv is not None else sys.argv[1:])
    commands = [command]
    old = RESULTS / f"halfcheetah{tag}.json"
    if args.resume and old.exists():
        prev = json.loads(old.read_text())
        runs = {k: [r for r in v if "error" not in r] for k, v in prev["runs"].items()}
        commands = prev.get("commands", [prev["command"]]) + commands
        info["earlier"] = prev["machine"]
        done = {(k, r["seed"]) for k, v in runs.items() for r in v}
        jobs = [j for j in jobs if (j[0], j[4]["seed"]) not in done]

    def save() -> None:
        info["loadavg_end"] = os.getloadavg()
        data = {"command": command, "commands": commands, "machine": info, "settings": vars(args) | {"sb3": SB3_ZOO},
                "runs": runs, "summary": summarise(runs, [a for a in SB3_ZOO if {f"sb3-{a}", f"proxrl-{PROXRL_ALGO[a]}"} & set(runs)])}
        write_json(f"halfcheetah{tag}.json", data)
        write_md(RESULTS / f"halfcheetah{tag}.md", data)
        plot(RESULTS / f"halfcheetah{tag}.png", runs, args.env)

    def one(job):
        name, algo, py, worker, task = job
        t0 = time.perf_counter()
        try:
            r = run_worker(py, worker, task, timeout=6 * 3600)
        except Exception as e:  # one failed run is recorded, the others go on
            r = {"error": str(e)[-500:]}
        r.update(seed=task["seed"], algo=algo, load=os.getloadavg()[0], elapsed=time.perf_counter() - t0)
        with lock:
            runs.setdefault(name, []).append(r)
            save()
        print(f"{name:16s} seed {task['seed']}: " + (f"eval {r['eval_return']:8.1f}  train {r['time']:7.1f} s  "
              f"cpu {r['cpu_time']:7.1f} s" if "error" not in r else "FAILED " + r["error"][-200:]), flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, jobs))
    save()
    return 0


def summarise(runs: dict, algos: list[str]) -> dict:
    s = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        s[name] = {"runs": len(ok), "failed": len(rs) - len(ok),
                   "median_eval_return": median([r["eval_return"] for r in ok]),
                   "median_time": median([r["time"] for r in ok]),
                   "median_cpu_time": median([r["cpu_time"] for r in ok])}
    for algo in algos:
        a, b = f"proxrl-{PROXRL_ALGO[algo]}", f"sb3-{algo}"
        if a in s and b in s and s[a]["median_time"] and s[b]["median_time"]:
            s[f"{algo}_ratio"] = {
                "time": s[a]["median_time"] / s[b]["median_time"],
                "cpu_time": s[a]["median_cpu_time"] / s[b]["median_cpu_time"],
                "return_diff": s[a]["median_eval_return"] - s[b]["median_eval_return"],
                "target_met": (s[a]["median_time"] <= 0.5 * s[b]["median_time"]
                               and s[a]["median_eval_return"] >= s[b]["median_eval_return"]),
            }
    return s


def write_md(path, data) -> None:
    runs, s = data["runs"], data["summary"]
    lines = [f"command: `{data['command']}`  ", f"machine: {data['machine']}", "",
             "| arm | seed | eval return | final train return | train wall s | CPU s | load at end |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            if "error" in r:
                lines.append(f"| {name} | {r['seed']} | failed | | | | |")
                continue
            ftr = r.get("final_train_return")
            lines.append(f"| {name} | {r['seed']} | {r['eval_return']:.1f} | "
                         + (f"{ftr:.1f}" if ftr is not None else "—")
                         + f" | {r['time']:.0f} | {r['cpu_time']:.0f} | {r['load']:.1f} |")
        m = s[name]
        if m["runs"]:
            lines.append(f"| **{name} median** | | **{m['median_eval_return']:.1f}** | | **{m['median_time']:.0f}** | "
                         f"{m['median_cpu_time']:.0f} | |")
    for k, v in s.items():
        if k.endswith("_ratio"):
            lines.append(f"\n{k[:-6]}: proxrl/peer median wall time **{v['time']:.3f}**, CPU time {v['cpu_time']:.3f}; "
                         f"median return difference {v['return_diff']:+.1f}; target (return ≥ peer, time ≤ 0.5×): "
                         f"{'met' if v['target_met'] else 'missed'}")
    path.write_text("\n".join(lines) + "\n")


def plot(path, runs, env) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"proxrl-ppo-clip": "tab:blue", "sb3-ppo": "tab:orange", "proxrl-trpo": "tab:green",
              "sb3-trpo": "tab:red"}
    for name, rs in runs.items():
        for i, r in enumerate(x for x in rs if x.get("curve")):
            c = r["curve"]
            lab = name if i == 0 else None
            axes[0].plot([p[0] for p in c], [p[2] for p in c], color=colors.get(name), alpha=0.7, label=lab)
            axes[1].plot([p[1] for p in c], [p[2] for p in c], color=colors.get(name), alpha=0.7, label=lab)
    for ax, xl in zip(axes, ["env steps", "wall-clock (s)"]):
        ax.set_xlabel(xl)
        ax.set_ylabel("training return (mean of last 10 episodes)")
        ax.legend()
    fig.suptitle(f"{env}: proxrl presets vs SB3 / sb3-contrib (rl-zoo), one curve per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
