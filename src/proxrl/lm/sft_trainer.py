"""Supervised fine-tuning (RLHF stage 1): next-token cross-entropy on the response tokens only.

Named choices: the prompt tokens carry no loss (the model learns to answer, not to write prompts); the
stop token is appended to every response so the model learns to stop (LM-2); the loss is the mean over all
response tokens of the optimizer batch (token-mean), split into micro-batches with exact weights.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Collection, Optional

import torch
import torch.nn.functional as F

from ..run import checkpoint
from ..run.dist import context
from ..run.fsdp import Deferred, full, gathered, lockstep, shard_model, to_layout
from ..run.guards import check_finite
from ..run.optim import make_adam
from ..run.resumable import StageCheckpoints, data_digest
from ..run.rundir import open_lm_run
from ..run.sgd import backward, chunks, sgd_epochs
from ..run.state import CHECKPOINT_VERSION, seed_everything
from .common import begin_stage, keep_freed_memory, scaler_summary, step_fields
from .config import SFTConfig
from .data import read_records
from .loading import (DTYPES, apply_finetune, check_fits_context, encode_prompt, ensure_pad_token, freeze, left_pad,
                      load_causal_lm, load_into, load_tokenizer, stop_token_ids, use_chat_template)
from .policy import autocast, float32_head, forward, grad_scaler, to_master


def sft_examples(tokenizer, records: list[dict], chat: bool, max_prompt: int, max_response: int, eos: int):
    """``(ids, loss_mask)`` per record: prompt ids (mask 0) ‖ response ids + EOS (mask 1)."""
    out = []
    for rec in records:
        q = encode_prompt(tokenizer, rec["prompt"], chat, max_prompt)
        a = tokenizer(rec["response"], add_special_tokens=False)["input_ids"][:max_response] + [eos]
        out.append((q + a, [0] * len(q) + [1] * len(a)))
    return out


def sft_loss_sum(model, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the tokens where ``loss_mask`` is 1 (positions t ≥ 1, predicted from t−1)."""
    logits, _ = forward(model, ids, mask, 0)
    if logits.dtype in (torch.bfloat16, torch.float16):  # the cross-entropy in float32 under autocast (a
        logits = logits.float()  # float64 model keeps float64: a float32 cast rounds its loss and gradients)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (ce.view(ids.shape[0], -1) * loss_mask[:, 1:]).sum()


def sft(config: SFTConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        explicit: Optional[Collection[str]] = None) -> dict:
    """Fine-tune ``config.model`` on ``config.data``; writes the run to ``config.out``; returns a summary.

    Checkpoints every ``checkpoint_every`` optimizer steps and on SIGINT/SIGTERM (then
    :class:`~proxrl.run.signals.RunInterrupted`, exit 130/143 from the CLI); ``config.resume = DIR``
    continues a stopped run exactly (:mod:`proxrl.run.resumable`; ``explicit``: the options given, checked
    against the saved run)."""
    cfg, resumed, overwrite = begin_stage(config, "sft", explicit)  # before any work
    keep_freed_memory()
    records = read_records(cfg.data, "sft")
    seed_everything(cfg.seed)
    base = load_causal_lm(cfg.model, DTYPES[cfg.dtype])
    check_fits_context(base, cfg.max_prompt_length, cfg.max_response_length, "max_response_length", eos=1)
    tok = load_tokenizer(cfg.model)
    pad = ensure_pad_token(tok, base)
    eos = stop_token_ids(tok, base, field="model")[0] if tok.eos_token_id is None else tok.eos_token_id
    freeze(float32_head(base))  # the logits in float32 under autocast
    model = to_master(apply_finetune(base, cfg)).to(cfg.device)  # float32 master weights of what trains
    chat = use_chat_template(tok, cfg.chat_template)
    d = context(cfg.device)
    if cfg.parallel == "fsdp" and d.on:  # sharded before the optimizer sees the parameters
        shard_model(model, d, cfg.device)
    examples = sft_examples(tok, records, chat, cfg.max_prompt_length, cfg.max_response_length, eos)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adam(params, lr=cfg.lr)
    scaler = grad_scaler(cfg.device, cfg.amp)  # fp16 only
    # several processes: each takes its rows of every batch; rank 0 writes (the old run, with --overwrite,
    # is removed only now that the model has loaded)
    d, writer, log = open_lm_run("sft", cfg, cfg.model, overwrite, log, resumed[1] if resumed else None)
    uniform = math.log(len(tok))  # the loss of a uniform guess over the tokenizer's ids (the logits' width)
    g = torch.Generator().manual_seed(cfg.seed)
    weights = lambda: {f"policy.lm.{n}": full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    ckpt = StageCheckpoints("sft", cfg, d, opt, scaler, g, weights,
                            lambda t: load_into(model, to_layout(model, {k[len("policy.lm."):]: v for k, v in t.items()})),
                            data_digest(examples), cfg.epochs * math.ceil(len(examples) / cfg.batch_size), writer)
    start = ckpt.restore(*resumed) if resumed else (0, 0)
    ckpt.extra.setdefault("warned", False)
    log(f"sft: {len(examples)} examples, {sum(p.numel() for p in params):,} trainable parameters"
        + (f"; resuming {cfg.out} after step {ckpt.step}/{ckpt.total_steps}" if resumed else ""))
    step, total = ckpt.step, 0.0

    def minibatch(rows: torch.Tensor, where: str) -> dict:
        n_tok = sum(sum(examples[i][1]) for i in rows.tolist())
        loss_sum = 0.0
        errors = Deferred(d.fsdp)  # fsdp: as many passes on every rank, a NaN raised after them
        # n_tok counts the whole batch: exact shares (a rank may hold no row of a small last batch)
        for micro, real in lockstep(d.local(rows).split(cfg.micro_batch_size), d, rows[:1]):
            ids, mask = left_pad([examples[i][0] for i in micro.tolist()], pad)
            lmask, _ = left_pad([examples[i][1] for i in micro.tolist()], 0)
            with autocast(cfg.device, cfg.amp):
                loss = sft_loss_sum(model, ids.to(cfg.device), mask.to(cfg.device), lmask.to(cfg.device)) / n_tok
            if not real:
                backward(loss * 0.0, scaler)  # zero gradients, the same collectives
                continue
            errors.call(check_finite, "loss", loss.detach(), None, where)
            backward(loss, scaler)
            loss_sum += float(loss.detach())
        errors.raise_first()
        return {"loss": loss_sum, "tokens": n_tok}

    def logged(epoch: int, st: dict, grad_norm: float) -> None:
        nonlocal step, total
        step, total = step + 1, float(d.all_reduce_(torch.tensor([st["loss"]], dtype=torch.float64)))
        fields, suffix = step_fields(grad_norm, scaler)
        writer.metrics({"step": step, "epoch": epoch, "loss": total, "tokens": st["tokens"], **fields,
                        "time": ckpt.elapsed()})
        log(f"sft step {step}  loss {total:.4f}" + suffix)
        if not ckpt.extra["warned"] and not fields["skipped"] and step >= 2 and total >= 0.98 * uniform \
                and grad_norm < 1e-6 and d.main:
            ckpt.extra["warned"] = True  # a diverged model predicts ~uniformly with saturated, zero-gradient logits
            print(f"warning: lr: SFT loss {total:.3f} is at ln(vocab) = {uniform:.3f} with gradient norm "
                  f"{grad_norm:.1e} after {step} steps: the model learns nothing; the learning rate {cfg.lr:g} is "
                  "probably far too large (try --lr 1e-4)", file=sys.stderr)

    with ckpt:  # SIGINT/SIGTERM: a checkpoint after the step in progress, then RunInterrupted;
        # after the last step the stage finishes (its final checkpoint, samples and summary), never killed half-way
        sgd_epochs([opt], params, cfg.epochs, ckpt.order(lambda: chunks(len(examples), cfg.batch_size, g)),
                         cfg.max_grad_norm, None, minibatch, after_step=ckpt.after_step(logged), dist=d,
                         scaler=scaler, start=start)
        tensors = weights()  # full tensors (fsdp: gathered from the shards on every rank)
        d.barrier()
        with gathered(model):  # fsdp: rank 0 generates with the whole weights, the others wait
            if d.main:
                checkpoint.save(Path(cfg.out) / "checkpoints", step, tensors,
                                {"stage": "sft", "version": CHECKPOINT_VERSION, "step": step}, keep=cfg.keep_checkpoints)
                writer.samples("after SFT (greedy, training prompts)", greedy_answers(model, tok, records[:3], chat, cfg, pad,
                                                                                      stop_token_ids(tok, base)))
        d.barrier()
        summary = {"steps": step, "final_loss": total, "wall_time": ckpt.elapsed()}
        if not d.main:
            return summary
        summary.update(scaler_summary(ckpt.skipped, scaler))
        checkpoint.write_json_atomic(Path(cfg.out) / "summary.json", summary)
    return summary


def greedy_answers(model, tok, records: list[dict], chat: bool, cfg, pad: int, stop: list[int]) -> list[tuple]:
    """``(prompt, greedy answer, nan)`` for each record: the readable samples of an SFT run."""
    items = []
    rows = getattr(model.config, "vocab_size", None) or len(tok)
    beyond = list(range(len(tok), rows)) or None  # embedding rows that are no tokens: never chosen (fit_vocabulary)
    with torch.inference_mode():
        for rec in records:
            q = torch.tensor([encode_prompt(tok, rec["prompt"], chat, cfg.max_prompt_length)], device=cfg.device)
            out = model.generate(input_ids=q, attention_mask=torch.ones_like(q), max_new_tokens=cfg.max_response_length,
                                 do_sample=False, pad_token_id=pad, eos_token_id=stop, suppress_tokens=beyond,
                                 synced_gpus=False)  # one rank generates (fsdp: with the weights gathered)
            items.append((rec["prompt"], tok.decode(out[0, q.shape[1]:], skip_special_tokens=True), float("nan")))
    return items
