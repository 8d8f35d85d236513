"""Target 2 — training throughput at identical hyperparameters (CleanRL's PPO defaults on CartPole-v1:
4 envs × 128 steps, 4 epochs × 4 minibatches, 64-64 tanh actor and critic, LR 2.5e-4 annealed, γ 0.99,
λ 0.95, clip 0.2 with value clipping, entropy 0.01, 100k steps): proxrl vs Stable-Baselines3 PPO,
repetitions interleaved in the same run, median env steps per second of the whole training call.

    python benchmarks/throughput.py                          # 3 repetitions, torch threads = 1 on both sides
    python benchmarks/throughput.py --sb3-default-threads    # add SB3 with torch's default thread count
    python benchmarks/throughput.py --cleanrl ~/src/cleanrl  # add CleanRL's own ppo.py from a checkout

Each side uses its own standard vector env: proxrl Gymnasium's numpy-vectorised CartPole, SB3 its
DummyVecEnv, CleanRL gymnasium.vector.SyncVectorEnv. Timed: building envs and model + ``learn``/``train``
(imports and the first torch optimizer, which imports torch._dynamo, excluded on both sides).
Results: benchmarks/results/throughput.json|md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from _common import command_line, RESULTS, add_peer_args, machine, median, peer_python, run_worker, write_json

CLEANRL = dict(num_envs=4, num_steps=128, update_epochs=4, num_minibatches=4, lr=2.5e-4, anneal_lr=True,
               gamma=0.99, gae_lambda=0.95, clip_coef=0.2, clip_vloss=True, ent_coef=0.01, vf_coef=0.5,
               max_grad_norm=0.5, norm_adv="whiten", hidden=[64, 64], activation="tanh")
SB3_SAME = dict(n_envs=4, n_steps=128, batch_size=128, n_epochs=4, learning_rate="lin_2.5e-4", gamma=0.99,
                gae_lambda=0.95, clip_range=0.2, clip_range_vf=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
                normalize_advantage=True, net_arch=[64, 64])


def run_cleanrl(python: str, checkout: str, steps: int, seed: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [python, os.path.join(checkout, "cleanrl", "ppo.py"), "--env-id", "CartPole-v1", "--total-timesteps",
           str(steps), "--seed", str(seed), "--no-track", "--no-capture-video"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    sps = [int(m) for m in re.findall(r"SPS:\s*(\d+)", proc.stdout + proc.stderr)]
    # wall includes interpreter start-up and imports; CleanRL's own last SPS print excludes them
    return {"steps": steps, "time": wall, "sps": sps[-1] if sps else steps / wall, "sps_wall": steps / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--sb3-default-threads", action="store_true")
    ap.add_argument("--cleanrl", default=None, help="path of a CleanRL checkout (optional; never vendored)")
    ap.add_argument("--tag", default="")
    add_peer_args(ap)
    args = ap.parse_args(argv)
    peer = peer_python(args)
    base = dict(kind="throughput", env="CartPole-v1", steps=args.steps)
    arms = [("proxrl", lambda s: run_worker(sys.executable, "proxrl_worker", dict(base, seed=s, threads=1, proxrl=CLEANRL)))]
    if peer:
        arms.append(("sb3", lambda s: run_worker(peer, "sb3_worker", dict(base, seed=s, threads=1, sb3=SB3_SAME))))
        if args.sb3_default_threads:
            arms.append(("sb3-default-threads",
                         lambda s: run_worker(peer, "sb3_worker", dict(base, seed=s, threads=None, sb3=SB3_SAME))))
        if args.cleanrl:
            arms.append(("cleanrl", lambda s: run_cleanrl(peer, args.cleanrl, args.steps, s, 1)))
    info = machine(peer)
    runs = {name: [] for name, _ in arms}
    for rep in range(1, args.reps + 1):
        for name, fn in arms:
            r = fn(rep)
            r["rep"] = rep
            runs[name].append(r)
            print(f"rep {rep} {name:20s} {r['sps']:8.0f} steps/s ({r['time']:.1f} s)", flush=True)
    info["loadavg_end"] = os.getloadavg()
    summary = {name: {"median_sps": median([r["sps"] for r in rs]), "median_time": median([r["time"] for r in rs]),
                      "median_sps_cpu": median([r["steps"] / r["cpu_time"] for r in rs if r.get("cpu_time")])}
               for name, rs in runs.items()}
    for name in runs:
        if name != "proxrl":
            summary[f"ratio_vs_{name}"] = summary["proxrl"]["median_sps"] / summary[name]["median_sps"]
            if summary[name]["median_sps_cpu"]:
                summary[f"ratio_cpu_vs_{name}"] = summary["proxrl"]["median_sps_cpu"] / summary[name]["median_sps_cpu"]
    if "ratio_vs_sb3" in summary:
        summary["target_met"] = summary["ratio_vs_sb3"] >= 2.0
    tag = f"-{args.tag}" if args.tag else ""
    data = {"command": command_line("throughput.py", argv or sys.argv[1:]), "machine": info,
            "settings": vars(args) | {"proxrl": CLEANRL, "sb3": SB3_SAME}, "runs": runs, "summary": summary}
    write_json(f"throughput{tag}.json", data)
    lines = [f"command: `{data['command']}`  ", f"machine: {info}", "",
             "| rep | " + " | ".join(f"{n} steps/s" for n in runs) + " |", "|---|" + "---|" * len(runs)]
    for i in range(args.reps):
        lines.append(f"| {i + 1} | " + " | ".join(f"{runs[n][i]['sps']:.0f}" for n in runs) + " |")
    lines.append("| **median** | " + " | ".join(f"**{summary[n]['median_sps']:.0f}**" for n in runs) + " |")
    for name in runs:
        if name != "proxrl":
            lines.append(f"\nratio proxrl / {name}: **{summary[f'ratio_vs_{name}']:.2f}×** wall-clock steps/s"
                         + (f"; {summary[f'ratio_cpu_vs_{name}']:.2f}× per CPU-second (process time)"
                            if f"ratio_cpu_vs_{name}" in summary else ""))
    (RESULTS / f"throughput{tag}.md").write_text("\n".join(lines) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
