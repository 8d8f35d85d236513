"""Target 4 — RLHF PPO update time: proxrl's ``PPOTrainer`` vs TRL's last PPO trainer
(``trl.experimental.ppo.PPOTrainer``, trl 1.12.0) on identical tiny GPT-2 models, repetitions interleaved.

    bash benchmarks/setup_trl.sh                         # TRL's own venv (pinned torch first), once
    python benchmarks/rlhf_vs_trl.py                     # 3 repetitions × 6 updates per side
    python benchmarks/rlhf_vs_trl.py --no-peer --reps 1 --updates 2   # proxrl alone (CI smoke test)

Both sides, in fresh processes: the same tiny random GPT-2 (``proxrl.lm.tiny.make_tiny``, byte tokenizer)
as policy, frozen reference, value model (a second trunk with a scalar head) and reward model; full
fine-tuning, float32; batch 32 prompts, ≤ 32 response tokens (stop at EOS), temperature 0.7, 4 PPO epochs ×
4 minibatches of 8, fixed KL coefficient 0.05. Time per update = generation + scoring + reference/value
forwards + the 4 epochs of training; the first update of each process is warm-up and dropped; median over
all remaining updates of all repetitions. Results: benchmarks/results/rlhf_vs_trl[-TAG].json|md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

from _common import command_line, machine, median, run_worker, write_json, RESULTS

DEFAULT_TRL_VENV = Path(os.environ.get("PROXRL_TRL_VENV", Path.home() / ".cache" / "proxrl-trl"))
WORDS = ("the movie was a story of love and loss that never quite finds its heart but the acting is "
         "sharp and funny while the plot drags in the middle before a final act of surprising grace").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--updates", type=int, default=6, help="PPO updates per process (the first is warm-up)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--num-minibatches", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    ap.add_argument("--trl-python", default=None, help=f"python of TRL's venv (default {DEFAULT_TRL_VENV}/bin/python)")
    ap.add_argument("--no-peer", action="store_true", help="proxrl only (CI smoke test)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    peer = None
    if not args.no_peer:
        peer = Path(args.trl_python) if args.trl_python else DEFAULT_TRL_VENV / "bin" / "python"
        if not peer.exists():
            sys.exit(f"TRL python {peer} not found: run `bash benchmarks/setup_trl.sh` or pass --trl-python / --no-peer")
        peer = str(peer)
    from proxrl.lm.tiny import make_tiny

    info = machine(None)
    runs: dict[str, list] = {"proxrl": []} | ({"trl": []} if peer else {})
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny(Path(tmp) / "gpt2", arch="gpt2", layers=args.layers, hidden=args.hidden))
        base = dict(kind="rlhf_update", policy=model, prompts=prompts(4 * args.batch_size),
                    batch_size=args.batch_size, num_minibatches=args.num_minibatches,
                    micro_batch_size=args.micro_batch_size, epochs=args.epochs,
                    response_length=args.response_length, temperature=0.7, lr=1e-5, kl_coef=0.05,
                    updates=args.updates, threads=args.threads)
        for rep in range(1, args.reps + 1):
            sides = [("proxrl", sys.executable, "proxrl_worker")] + ([("trl", peer, "trl_worker")] if peer else [])
            for name, py, worker in sides:  # interleaved: each repetition runs both sides back to back
                r = run_worker(py, worker, dict(base, seed=rep))
                r["rep"] = rep
                runs[name].append(r)
                print(f"rep {rep} {name:6s} update s: " + " ".join(f"{t:.3f}" for t in r["update_times"]), flush=True)
    info["loadavg_end"] = os.getloadavg()
    summary = {}
    for name, rs in runs.items():
        ups = [t for r in rs for t in r["update_times"][1:]]
        gens = [t for r in rs if r.get("generation_times") for t in r["generation_times"][1:]]
        summary[name] = {"median_update": median(ups), "median_generation": median(gens), "updates_timed": len(ups)}
        if rs and "versions" not in summary[name]:
            summary[name]["versions"] = {k: rs[0].get(k) for k in ("torch", "transformers", "trl", "accelerate")
                                         if rs[0].get(k)}
    if "trl" in summary and summary["trl"]["median_update"]:
        summary["ratio_update"] = summary["proxrl"]["median_update"] / summary["trl"]["median_update"]
        if summary["trl"]["median_generation"] and summary["proxrl"]["median_generation"]:
            summary["ratio_generation"] = summary["proxrl"]["median_generation"] / summary["trl"]["median_generation"]
        summary["target_met"] = summary["ratio_update"] <= 0.5
    tag = f"-{args.tag}" if args.tag else ""
    data = {"command": command_line("rlhf_vs_trl.py", argv if argv is not None else sys.argv[1:]),
            "machine": info, "settings": vars(args) | {"trl_python": None}, "runs": runs, "summary": summary}
    write_json(f"rlhf_vs_trl{tag}.json", data)
    write_md(RESULTS / f"rlhf_vs_trl{tag}.md", data)
    print({k: v for k, v in summary.items()})
    return 0


def write_md(path, data) -> None:
    s = data["summary"]
    lines = [f"command: `{data['command']}`  ", f"machine: {data['machine']}", "",
             "| side | rep | update s (first = warm-up) | generation s |", "|---|---|---|---|"]
    for name, rs in data["runs"].items():
        for r in rs:
            g = r.get("generation_times")
            lines.append(f"| {name} | {r['rep']} | " + " ".join(f"{t:.3f}" for t in r["update_times"]) + " | "
                         + (" ".join(f"{t:.3f}" for t in g) if g else "—") + " |")
    for name in data["runs"]:
        m = s[name]
        lines.append(f"| **{name} median** | | **{m['median_update']:.3f}** ({m['updates_timed']} updates) | "
                     + (f"{m['median_generation']:.3f}" if m["median_generation"] else "—") + " |")
    if "ratio_update" in s:
        lines += ["", f"ratio proxrl/TRL of the median update time: **{s['ratio_update']:.3f}** "
                      f"(target ≤ 0.5: {'met' if s['target_met'] else 'missed'})"
                  + (f"; generation alone: {s['ratio_generation']:.3f}" if "ratio_generation" in s else "")]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
