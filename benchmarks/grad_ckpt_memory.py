"""Peak memory of one training forward+backward of SmolLM2-135M with and without --gradient-checkpointing
(each in a fresh process; peak resident size above the size after loading), and its time.

    python benchmarks/grad_ckpt_memory.py [--batch 8] [--length 128] [--finetune full]   → stdout (JSON lines)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import ROOT

WORKER = r'''
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[2])
a = json.loads(sys.argv[1]); torch.set_num_threads(2)
from proxrl.lm.config import PPOConfig
from proxrl.lm.demo_pipeline import smollm2_gguf
from proxrl.lm.policy import build_policy
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
pol = build_policy(smollm2_gguf(), PPOConfig(policy="x", finetune=a["finetune"], gradient_checkpointing=a["ckpt"]))
ids = torch.randint(10, 1000, (a["batch"], a["length"]), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
logp, v, _ = pol(ids, mask, 4, 1.0, values=True, entropy=False)  # warm-up (allocator, kernels)
(logp.sum() + v.sum()).backward(); pol.zero_grad(set_to_none=False)
base = rss(); t = time.perf_counter()
logp, v, _ = pol(ids, mask, a["length"] // 2, 1.0, values=True, entropy=False)
(logp.sum() + v.sum()).backward()
print(json.dumps({**a, "peak_above_loaded_mib": rss() - base, "seconds": time.perf_counter() - t}))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--finetune", default="full")
    a = ap.parse_args()
    for ckpt in (False, True):
        task = json.dumps({"ckpt": ckpt, "batch": a.batch, "length": a.length, "finetune": a.finetune})
        out = subprocess.run([sys.executable, "-c", WORKER, task, str(ROOT / "src")], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
