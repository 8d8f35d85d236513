"""Issue 10: does mixed-precision PPO on a tiny model learn like float32? Over seeds, paired.

For each seed s (the tiny model's initialisation *and* the run seed), the same PPO budget is run once per
precision (fp32, bf16, optionally fp16) one after another in this process (torch threads 1 by default).
The reward is checkable: the share of ASCII lower-case letters in the response. Per run, the gain is the
mean reward of the last 4 updates minus that of the first 4; per seed the paired difference is
gain(precision) − gain(fp32), summarised by its mean and standard error over seeds.

    python benchmarks/bf16_parity.py [--seeds 1 … 20] [--precisions fp32 bf16 fp16] [--tag T]
        → results/bf16_parity[-T].{json,md}

``run_one`` is also the budget of the slow test ``test_bf16_autocast_learns_like_float32``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:  # run from a checkout without installing proxrl
    sys.path.insert(0, str(HERE.parent / "src"))

#: the budget: 16 updates of 32 responses of up to 8 tokens, 4 epochs × 2 minibatches, all weights trained
BUDGET = dict(batch_size=32, micro_batch_size=16, num_minibatches=2, response_length=8, update_epochs=4,
              lr=3e-3, finetune="full", kl_coef=0.0, temperature=1.0, chat_template="off")
UPDATES = 16
WINDOW = 4


def share_of_letters(prompts, responses):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def make_model(out: Path, seed: int) -> str:
    from proxrl.lm.tiny import make_tiny

    return str(make_tiny(out, hidden=64, seed=seed))


def run_one(model: str, precision: str, seed: int, updates: int = UPDATES) -> dict:
    """One PPO run; returns the per-update mean rewards, the gain and how far the weights moved."""
    import torch

    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import PPOConfig

    tr = PPOTrainer(PPOConfig(policy=model, out="unused", precision=precision, seed=seed, **BUDGET),
                    reward=share_of_letters)
    w0 = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    rewards, skipped, t0 = [], 0, time.perf_counter()
    for _ in range(updates):
        ro = tr.generate([f"say {i}:" for i in range(BUDGET["batch_size"])])
        s = tr.score(ro)
        rewards.append(float(s.mean()))
        m = tr.step(ro, s)
        skipped += int(m.get("steps_skipped") or 0)
    moved = sum(float((p.detach() - w0[n]).norm() ** 2) for n, p in tr.policy.named_parameters() if p.requires_grad)
    w_norm = sum(float(w.norm() ** 2) for w in w0.values())
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    return {"precision": precision, "seed": seed, "rewards": rewards, "first": first, "last": last,
            "gain": last - first, "relative_weight_change": math.sqrt(moved / w_norm), "optimizer_steps_skipped": skipped,
            "wall_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}


def paired(runs: list[dict], precision: str, baseline: str = "fp32") -> dict:
    """Per-seed gain(precision) − gain(baseline): the differences, their mean and standard error."""
    by = {(r["precision"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if (baseline, r["seed"]) in by and (precision, r["seed"]) in by})
    d = [by[(precision, s)]["gain"] - by[(baseline, s)]["gain"] for s in seeds]
    g0 = [by[(baseline, s)]["gain"] for s in seeds]
    g1 = [by[(precision, s)]["gain"] for s in seeds]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"seeds": seeds, "diff": d, "mean_diff": statistics.fmean(d) if d else float("nan"), "se_diff": se,
            f"mean_gain_{baseline}": statistics.fmean(g0) if g0 else float("nan"),
            f"mean_gain_{precision}": statistics.fmean(g1) if g1 else float("nan"),
            "ratio_of_mean_gains": statistics.fmean(g1) / statistics.fmean(g0) if g0 and statistics.fmean(g0) else float("nan")}


def markdown(data: dict) -> str:
    runs, precs = data["runs"], data["precisions"]
    by = {(r["precision"], r["seed"]): r for r in runs}
    lines = [f"# Mixed-precision PPO parity on a tiny model ({data['machine']['date']})", "",
             f"Budget: {UPDATES} updates, {json.dumps(BUDGET)}; reward = share of lower-case letters; "
             f"gain = mean reward of the last {WINDOW} updates − the first {WINDOW}; torch threads "
             f"{data['threads']}; torch {data['machine']['torch']}.", "",
             "| seed | " + " | ".join(f"{p} first→last (gain)" for p in precs) + " | "
             + " | ".join(f"{p} − fp32" for p in precs if p != "fp32") + " |",
             "|---|" + "---|" * (len(precs) + len(precs) - 1)]
    for s in data["seeds"]:
        cells = []
        for p in precs:
            r = by.get((p, s))
            cells.append(f"{r['first']:.3f}→{r['last']:.3f} ({r['gain']:+.3f})" if r else "—")
        for p in precs:
            if p != "fp32":
                r, b = by.get((p, s)), by.get(("fp32", s))
                cells.append(f"{r['gain'] - b['gain']:+.3f}" if r and b else "—")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    for p, summ in data["paired"].items():
        lines.append(f"* **{p} − fp32**: mean gain difference {summ['mean_diff']:+.4f} ± {summ['se_diff']:.4f} (SE, "
                     f"n = {len(summ['seeds'])}); mean gains fp32 {summ['mean_gain_fp32']:.4f}, {p} "
                     f"{summ[f'mean_gain_{p}']:.4f} (ratio {summ['ratio_of_mean_gains']:.2f}).")
    skipped = {p: sum(r["optimizer_steps_skipped"] for r in runs if r["precision"] == p) for p in precs}
    moved = {p: min(r["relative_weight_change"] for r in runs if r["precision"] == p) for p in precs}
    lines.append(f"* smallest relative weight change ‖Δθ‖/‖θ₀‖ per precision: "
                 + ", ".join(f"{p} {v:.3g}" for p, v in moved.items())
                 + "; optimizer steps skipped by the gradient scaler: " + ", ".join(f"{p} {v}" for p, v in skipped.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 21)))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--updates", type=int, default=UPDATES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import torch

    from _common import RESULTS, machine

    torch.set_num_threads(args.threads)
    precs = ["fp32"] + [p for p in args.precisions if p != "fp32"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            model = make_model(Path(tmp) / f"m{s}", s)
            for p in precs:
                r = run_one(model, p, s, args.updates)
                runs.append(r)
                print(f"seed {s} {p}: {r['first']:.3f}→{r['last']:.3f} gain {r['gain']:+.3f} "
                      f"({r['wall_s']:.0f}s)", file=sys.stderr, flush=True)
    data = {"machine": machine(None), "threads": args.threads, "seeds": args.seeds, "precisions": precs,
            "budget": {**BUDGET, "updates": args.updates, "window": WINDOW}, "runs": runs,
            "paired": {p: paired(runs, p) for p in precs if p != "fp32"}}
    name = "bf16_parity" + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    md = markdown(data)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
