"""Issue 10 benchmarks, side by side in one run (each measurement in a fresh process, interleaved reps):

* peak memory of one PPO update of SmolLM2-135M (all weights, and LoRA) against a plain Hugging Face
  forward+backward of the same shapes (micro-batch × (prompt + response) tokens, cross-entropy on the
  response positions) — the peak resident size above the size after loading;
* tokens/s of proxrl's sampling loop (:func:`proxrl.lm.sampling.sample`) against
  ``model.generate(do_sample=True, top_k=0)`` for the same prompt ids and length: both in one process,
  interleaved pair by pair (alternating which goes first), each timed from token ids to token ids and drawing
  exactly ``response`` tokens per row (no stop token); the ratio is the median of the pairs' ratios. ``PPOTrainer.generate`` (which also tokenises, truncates at the stop token
  and decodes) is reported on its own line. (Before: the two samplers ran in separate processes, and the
  proxrl side timed ``PPOTrainer.generate`` with its decoding against bare ``generate``, and tokens/s counted
  the tokens before each row's stop token, which depends on the two samplers' different draws.)

    python benchmarks/lm_memory.py [--tiny] [--reps 3]     → results/lm_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import RESULTS, ROOT, machine

WORKER = r'''
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
task = json.loads(sys.argv[1]); model = sys.argv[2]
from proxrl.lm import PPOTrainer
from proxrl.lm.config import PPOConfig
B, P, R, mb = task["batch"], task["prompt"], task["response"], task["micro"]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
cfg = PPOConfig(policy=model, finetune=task["finetune"], lora_r=8, chat_template="off", batch_size=B, num_minibatches=1,
                micro_batch_size=mb, forward_batch_size=mb, update_epochs=1, response_length=R, max_prompt_length=P,
                temperature=1.0, seed=0)
tr = PPOTrainer(cfg, reward=lambda p, r: [0.0] * len(r))
torch.manual_seed(0)
vocab = tr.policy.lm.get_output_embeddings().weight.shape[0]
prompts = [" ".join(["movie"] * (P - 1))] * B
out = {}
if task["mode"] == "sample":
    # fair: both samplers in this one process on the same prompt ids, interleaved pair by pair (alternating
    # which goes first), each timed from ids to ids — no tokenising or decoding on either side — and each
    # drawing exactly R tokens per row (no stop token on either side: tokens/s is not confounded by how long
    # the two samplers' different draws happen to run before every row stops); the whole
    # PPOTrainer.generate (encode, sample with stops, truncate, decode) is reported separately
    from proxrl.lm.loading import left_pad
    from proxrl.lm.sampling import sample
    q, m = left_pad(tr.encode(prompts), tr.pad_id)
    lm = tr.policy.lm
    gen = lambda n, s: lm.generate(input_ids=q[:n], attention_mask=m[:n], do_sample=True, top_k=0, top_p=1.0,
                                   temperature=1.0, max_new_tokens=R, pad_token_id=tr.pad_id,
                                   eos_token_id=None)[:, q.shape[1]:]  # None: no stopping, R tokens
    own = lambda n, s: sample(lm, q[:n], m[:n], R, 1.0, [-1], tr.pad_id, torch.Generator().manual_seed(s))
    def timed(fn, n, s):
        torch.manual_seed(s)
        t0 = time.perf_counter(); o = fn(n, s); dt = time.perf_counter() - t0
        assert o.shape == (n, R), o.shape
        return o.numel() / dt
    with torch.inference_mode():
        timed(own, 2, 0); timed(gen, 2, 0)
        runs = {"proxrl": [], "generate": []}
        for i in range(task["pairs"]):
            for name in (("proxrl", "generate") if i % 2 == 0 else ("generate", "proxrl")):
                runs[name].append(timed(own if name == "proxrl" else gen, B, i + 1))
    tr.generate(prompts[:2]); t0 = time.perf_counter(); ro = tr.generate(prompts, seed=1)
    out = {"runs": runs, "pair_ratios": [a / b for a, b in zip(runs["proxrl"], runs["generate"])],
           "trainer_generate_tokens_per_s": float(ro.response_mask.sum()) / (time.perf_counter() - t0)}
else:
    ids = torch.randint(3, vocab, (B, P + R))
    mask = torch.ones_like(ids)
    base = rss()
    if task["mode"] == "update":
        from proxrl.lm.rollout import Rollout
        ro = Rollout(prompts, ids[:, :P], mask[:, :P], ids[:, P:], mask[:, P:], torch.zeros(B, dtype=torch.bool), [""] * B)
        tr.step(ro, torch.zeros(B, dtype=torch.float64))
    else:  # a plain Hugging Face forward+backward of the same micro-batches
        lm = tr.policy.lm
        for i in range(0, B, mb):
            x = ids[i:i + mb]
            logits = lm(input_ids=x, attention_mask=mask[i:i + mb]).logits[:, P - 1:-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, P:].reshape(-1))
            loss.backward()
    out["peak_mib"] = rss() - base
print(json.dumps(out))
'''


def measure(task: dict, model: str, threads: int) -> dict:
    env = dict(os.environ, PROXRL_KEEP_FREED_MEMORY="0")  # glibc's own allocator: RSS shows what is used
    p = subprocess.run([sys.executable, "-c", WORKER, json.dumps(task), model, str(ROOT / "src"), str(threads)],
                       capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4, help="interleaved proxrl/generate sampling pairs per repetition")
    ap.add_argument("--parts", nargs="+", default=["memory", "sampling"], choices=["memory", "sampling"],
                    help="what to measure (e.g. --parts sampling --out benchmarks/results/lm_sampling)")
    ap.add_argument("--out", default=str(RESULTS / "lm_memory"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.tiny:
        import atexit
        import shutil
        import tempfile

        from proxrl.lm.tiny import make_tiny

        tmp = tempfile.mkdtemp(prefix="proxrl-lm-memory-")
        atexit.register(shutil.rmtree, tmp, True)  # the tiny model is removed at exit
        model = str(make_tiny(Path(tmp) / "tiny", hidden=64, seed=0))
    else:
        from proxrl.lm.demo_pipeline import smollm2_gguf

        model = smollm2_gguf()
    shapes = dict(batch=args.batch, prompt=16, response=32, micro=max(args.batch // 2, 1))
    rows = {}
    for rep in range(args.reps):
        for finetune in ("full", "lora") if "memory" in args.parts else ():
            for mode in ("update", "plain"):
                r = measure({**shapes, "finetune": finetune, "mode": mode}, model, args.threads)
                rows.setdefault(f"{finetune}/{mode}", []).append(r["peak_mib"])
                print(f"rep {rep} {finetune} {mode}: peak +{r['peak_mib']:.0f} MiB", file=sys.stderr)
        if "sampling" not in args.parts:
            continue
        r = measure({**shapes, "finetune": "lora", "mode": "sample", "pairs": args.pairs}, model, args.threads)
        for name in ("proxrl", "generate"):
            rows.setdefault(f"sample-{name}", []).extend(r["runs"][name])
        rows.setdefault("sample-ratio", []).extend(r["pair_ratios"])
        rows.setdefault("sample-trainer", []).append(r["trainer_generate_tokens_per_s"])
        print(f"rep {rep} sampling tokens/s: proxrl {r['runs']['proxrl']}, generate {r['runs']['generate']}, "
              f"PPOTrainer.generate {r['trainer_generate_tokens_per_s']:.1f}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    summary = {"model": "tiny llama" if args.tiny else "SmolLM2-135M-Instruct", "machine": machine(None),
               "shapes": shapes, "threads": args.threads, "reps": rows, "median": med,
               "peak_ratio_full": med["full/update"] / med["full/plain"] if "memory" in args.parts else None,
               "peak_ratio_lora": med["lora/update"] / med["lora/plain"] if "memory" in args.parts else None,
               # median of the in-process interleaved pairs' ratios
               "sampling_ratio": med["sample-ratio"] if "sampling" in args.parts else None,
               "trainer_generate_vs_generate": (med["sample-trainer"] / med["sample-generate"]
                                                if "sampling" in args.parts else None)}
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2))
    md = [f"# LM memory and sampling ({summary['model']}, {args.threads} threads, medians of {args.reps})", "",
          f"shapes: batch {shapes['batch']}, micro-batch {shapes['micro']}, prompt {shapes['prompt']} + response "
          f"{shapes['response']} tokens", "", "| quantity | proxrl | plain HF | ratio |", "|---|---|---|---|"]
    if "memory" in args.parts:
        md += [
          f"| peak memory of an update, all weights (MiB above loaded) | {med['full/update']:.0f} | {med['full/plain']:.0f} | {summary['peak_ratio_full']:.2f} |",
          f"| peak memory of an update, LoRA (MiB above loaded) | {med['lora/update']:.0f} | {med['lora/plain']:.0f} | {summary['peak_ratio_lora']:.2f} |"]
    if "sampling" in args.parts:
        md += [
          f"| sampling tokens/s (proxrl's loop vs generate, ids to ids, R tokens per row, interleaved in one process; ratio: median of the pairs') | {med['sample-proxrl']:.1f} | {med['sample-generate']:.1f} | {summary['sampling_ratio']:.2f} |",
          f"| PPOTrainer.generate (encode + loop + truncate + decode) vs generate | {med['sample-trainer']:.1f} | {med['sample-generate']:.1f} | {summary['trainer_generate_vs_generate']:.2f} |"]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print(json.dumps({k: summary[k] for k in ("peak_ratio_full", "peak_ratio_lora", "sampling_ratio")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
