"""``proxrl export RUN --out DIR``: a trained SFT or RL run as a standard Hugging Face model directory that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads without proxrl — LoRA merged into the weights (default)
or, with ``--adapter``, the peft adapter alone (``PeftModel.from_pretrained(base, DIR)``; when proxrl added a pad
token the base is resized first, as the result's ``load`` says); the tokenizer (with the pad token used in
training) beside it; safetensors only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..run.rundir import check_not_inside_run
from .loading import load_run_policy, load_tokenizer, read_run_config


@dataclass
class ExportConfig:
    run: str = ""
    """an `rlhf sft` or `rlhf ppo`/`rlhf train` run directory"""
    out: str = ""
    """output directory (created; must not hold files already)"""
    adapter: bool = False
    """write the LoRA adapter (peft format) instead of merged weights (runs fine-tuned with LoRA only)"""
    dtype: str = "float32"
    """dtype of the written weights: float32 or bfloat16"""


def export(cfg: ExportConfig) -> dict:
    run = read_run_config(cfg.run) if cfg.run else None
    if run is None or run.get("stage") not in ("sft", "ppo"):
        raise ConfigError("run", f"{cfg.run!r} is not an SFT or RL run directory (no config.json with stage sft/ppo)",
                          "pass the --out directory of `proxrl rlhf sft|ppo`")
    if not cfg.out:
        raise ConfigError("out", "is required", "pass --out DIR")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("out", f"{out} exists and is not an empty directory", "choose a new directory")
    check_not_inside_run(out)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if cfg.dtype not in dtypes:
        raise ConfigError("dtype", f"must be float32 or bfloat16, got {cfg.dtype!r}")
    lora = run["config"].get("finetune") == "lora"
    if cfg.adapter and not lora:
        raise ConfigError("adapter", f"the run fine-tuned {run['config'].get('finetune')!r} weights, not LoRA",
                          "export merged weights (drop --adapter)")
    model, tok = load_run_policy(cfg.run, run, dtypes[cfg.dtype], merge=not cfg.adapter, with_tokenizer=True)
    for p in model.parameters():  # peft keeps its adapter in float32 whatever the base: written in --dtype
        p.data = p.data.to(dtypes[cfg.dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    result = {"exported": str(out), "format": "peft adapter" if cfg.adapter else "merged model",
              "base_model": run["base_model"]}
    rows = model.get_input_embeddings().weight.shape[0]
    if cfg.adapter and len(tok) > len(load_tokenizer(run["base_model"])) and rows == len(tok):
        # proxrl added a pad token and grew the embeddings for it (LM-1): the adapter carries the grown (frozen,
        # deterministic) embeddings, which the plain base does not fit until it is resized
        result["load"] = (f"base.resize_token_embeddings({rows}) before PeftModel.from_pretrained(base, "
                          f"{str(out)!r}): proxrl added the tokenizer's pad token")
    return result
