"""Behaviour fingerprint of every gym rung and each LM stage on tiny problems.

A refactor that must not change behaviour is checked by running this before and after it and comparing
the JSON: each entry is a SHA-256 over the metrics lines (wall-clock fields removed), the final
checkpoint's tensors (bytes) and the evaluation. Only the public API is used, so the script runs
unchanged across layouts. CPU, float rounding of this machine: compare runs of one machine only.

    python benchmarks/fingerprint.py --out fingerprint.json [--only ppo-clip,lm-ppo]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

WALL = {"time", "sps", "update_time", "forward_time", "train_time", "generate_time", "score_time", "tokens_per_s",
        "wall_time", "ppo_wall_time"}
GYM_RUNGS = ["pg", "pg-baseline", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo", "npg"]


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in WALL and not k.endswith("_time")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tensors_digest(run: Path) -> str:
    from safetensors.torch import load_file

    ckpts = sorted((run / "checkpoints").glob("ckpt-*"))
    h = hashlib.sha256()
    tensors = load_file(str(ckpts[-1] / "tensors.safetensors"))
    for k in sorted(tensors):
        if k.startswith("rng/"):
            continue
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _values_digest(run: Path) -> str:
    """The final checkpoint's policy tensors by name and its optimizer tensors as a set of values, whatever
    their key names: unchanged when only the layout is renamed (gym layout 3 merged two optimizers into one)."""
    from safetensors.torch import load_file

    torch = __import__("torch")
    tensors = load_file(str(sorted((run / "checkpoints").glob("ckpt-*"))[-1] / "tensors.safetensors"))
    raw = lambda t: t.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()  # noqa: E731
    h = hashlib.sha256()
    for k in sorted(k for k in tensors if k.startswith("policy/")):
        h.update(k.encode() + raw(tensors[k]))
    opt = sorted(hashlib.sha256(raw(v)).hexdigest() for k, v in tensors.items() if "opt" in k.split("/")[0])
    h.update("".join(opt).encode())
    return h.hexdigest()


def _metrics_digest(run: Path) -> str:
    rows = [_strip(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(_strip(obj), sort_keys=True, default=str).encode()).hexdigest()


def gym(algo: str, tmp: Path) -> dict:
    import proxrl

    env = "Pendulum-v1" if algo.endswith("-cont") else "CartPole-v1"
    algo = algo.removesuffix("-cont")
    run = tmp / f"gym-{env}-{algo}"
    proxrl.train(env=env, algo=algo, steps=2048, num_envs=4, num_steps=128, seed=3, out=str(run), progress="off",
                 preset="none")
    ev = proxrl.evaluate(run, episodes=3, seed=7)
    return {"metrics": _metrics_digest(run), "weights": _tensors_digest(run), "values": _values_digest(run),
            "eval": _digest(ev)}


def lm(stage: str, tmp: Path) -> dict:
    import proxrl.lm as L
    from proxrl.lm.config import PPOConfig, RMConfig, SFTConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.tiny import make_tiny

    model = tmp / "tiny"
    if not model.exists():
        make_tiny(model, seed=0)
    prompts = [f"prompt number {i} says" for i in range(12)]
    quiet = lambda *a, **k: None
    if stage == "lm-sft":
        write_jsonl(tmp / "sft.jsonl", [{"prompt": p, "response": "yes a fine answer"} for p in prompts])
        out = tmp / "sft"
        s = L.sft(SFTConfig(model=str(model), data=str(tmp / "sft.jsonl"), out=str(out), batch_size=4,
                            micro_batch_size=2, lr=1e-3, chat_template="off"), log=quiet)
        return {"metrics": _metrics_digest(out), "weights": _tensors_digest(out), "summary": _digest(s)}
    if stage == "lm-rm":
        write_jsonl(tmp / "rm.jsonl", [{"prompt": p, "chosen": "good good", "rejected": "bad"} for p in prompts])
        out = tmp / "rm"
        s = L.reward_model(RMConfig(model=str(model), data=str(tmp / "rm.jsonl"), out=str(out), batch_size=4,
                                    micro_batch_size=2, lr=1e-3, chat_template="off", eval_fraction=0.25), log=quiet)
        return {"metrics": _metrics_digest(out), "weights": _tensors_digest(out), "summary": _digest(s)}
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in prompts])
    surrogate = "kl-penalty" if stage == "lm-ppo-kl" else "clip"
    out = tmp / stage

    def reward(ps, rs):
        return [r.count("a") / 4.0 for r in rs]

    s = L.ppo(PPOConfig(policy=str(model), prompts=str(tmp / "prompts.jsonl"), out=str(out), updates=3, batch_size=4,
                        num_minibatches=2, micro_batch_size=1, response_length=6, eval_prompts=2, lr=1e-3,
                        chat_template="off", surrogate=surrogate, reward="fp:reward"), reward=reward, log=quiet)
    return {"metrics": _metrics_digest(out), "weights": _tensors_digest(out), "summary": _digest(s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="-")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    names = GYM_RUNGS + ["ppo-clip-cont", "lm-sft", "lm-rm", "lm-ppo", "lm-ppo-kl"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    result = {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            result[name] = lm(name, Path(d)) if name.startswith("lm-") else gym(name, Path(d))
            print(f"{name}: {result[name]}", file=sys.stderr)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
