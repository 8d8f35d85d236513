"""Reward model (RLHF stage 2): the LM trunk with a scalar head, trained on preference pairs.

Named choices: Bradley–Terry loss −log σ(r(x, y_chosen) − r(x, y_rejected)); the score is read at the
last real token (LM-4), which is the appended stop token, as in a finished PPO response; pairwise
accuracy counts a tie as ½; after training the scores are normalised to mean 0, std 1 over the training
pairs' chosen and rejected responses (the statistics live in the checkpoint).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Collection, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..run import checkpoint
from ..run.dist import context
from ..run.fsdp import Deferred, gathered, lockstep, shard_model, to_layout
from ..run.guards import check_finite
from ..run.optim import make_adam
from ..errors import ConfigError
from ..run.resumable import StageCheckpoints, data_digest
from ..run.rundir import open_lm_run
from ..run.sgd import backward, chunks, sgd_epochs
from ..run.state import CHECKPOINT_VERSION, seed_everything
from .common import begin_stage, keep_freed_memory, scaler_summary, step_fields
from .config import RMConfig
from .data import read_records
from .loading import check_fits_context, encode_prompt, left_pad, load_into, use_chat_template
from .policy import build_reward_model, grad_scaler


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Mean of −log σ(r_c − r_r) over pairs (logsigmoid: stable for large margins)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Share of pairs ranked correctly; a tie counts ½."""
    return ((r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()).mean()


def encode_pairs(tokenizer, records: list[dict], chat: bool, max_prompt: int, max_response: int):
    eos = tokenizer.eos_token_id
    if eos is None:  # the score is read at the appended stop token
        raise ConfigError("model", "its tokenizer has no EOS token, which the reward is read at",
                          "use a model whose tokenizer sets eos_token")
    out = []
    for rec in records:
        q = encode_prompt(tokenizer, rec["prompt"], chat, max_prompt)
        c = tokenizer(rec["chosen"], add_special_tokens=False)["input_ids"][:max_response] + [eos]
        r = tokenizer(rec["rejected"], add_special_tokens=False)["input_ids"][:max_response] + [eos]
        out.append((q + c, q + r))
    return out


def score_pairs(rm, pairs: list[tuple[list[int], list[int]]], pad: int, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Raw scores of chosen and rejected, both in one left-padded forward: ``[m]``, ``[m]``."""
    ids, mask = left_pad([p[0] for p in pairs] + [p[1] for p in pairs], pad)
    r = rm.raw(ids.to(device), mask.to(device))
    return r[:len(pairs)], r[len(pairs):]


def held_out(n: int, eval_fraction: float) -> int:
    """Pairs held out for the accuracy: at least one when there are two or more and the fraction is > 0."""
    return 0 if n < 2 or eval_fraction == 0 else max(1, round(eval_fraction * n))


def reward_model(config: RMConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 explicit: Optional[Collection[str]] = None) -> dict:
    """Train a reward model on ``config.data``; writes the run to ``config.out``; returns a summary with
    ``eval_accuracy`` (held-out pairwise accuracy). Checkpoints and resume as :func:`proxrl.lm.sft_trainer.sft`."""
    cfg, resumed, overwrite = begin_stage(config, "rm", explicit)  # before any work
    keep_freed_memory()
    records = read_records(cfg.data, "rm")
    if len(records) < 2:
        raise ConfigError("data", f"{cfg.data} holds {len(records)} preference pair; a reward model needs at least 2",
                          "add pairs")
    n_eval = held_out(len(records), cfg.eval_fraction)
    if n_eval >= len(records):
        raise ConfigError("eval_fraction", f"{cfg.eval_fraction} holds out {n_eval} of the {len(records)} pairs, "
                          "leaving none for training", "pass a smaller --eval-fraction (or 0), or add pairs")
    seed_everything(cfg.seed)
    rm = build_reward_model(cfg.model, cfg)
    check_fits_context(rm.lm, cfg.max_prompt_length, cfg.max_response_length, "max_response_length", eos=1)
    tok = rm.tokenizer
    chat = use_chat_template(tok, cfg.chat_template)
    pairs = encode_pairs(tok, records, chat, cfg.max_prompt_length, cfg.max_response_length)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    n_eval = held_out(len(pairs), cfg.eval_fraction)
    eval_pairs = [pairs[i] for i in order[:n_eval]]
    train_pairs = [pairs[i] for i in order[n_eval:]]
    d = context(cfg.device)
    same = [i for i, (c, r) in enumerate(pairs) if c == r]
    if same and d.main:  # silent otherwise: their loss is log 2 with no gradient, and each counts ½ in the accuracy
        cut = sum(records[i]["chosen"] != records[i]["rejected"] for i in same)
        print(f"warning: data: {len(same)} of {len(pairs)} preference pairs have the same chosen and rejected tokens"
              + (f" ({cut} only once their responses are cut to max_response_length {cfg.max_response_length})"
                 if cut else "") + f" (first: record {same[0] + 1} of the data): they train nothing and count ½ "
              "in the pairwise accuracy; remove them" + (" or raise --max-response-length" if cut else ""), file=sys.stderr)
    if cfg.parallel == "fsdp" and d.on:  # sharded (trunk and head) before the optimizer sees it
        shard_model(rm, d, cfg.device, warmup=lambda m, ids: m.raw(ids, torch.ones_like(ids)))
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = make_adam(params, lr=cfg.lr)
    scaler = grad_scaler(cfg.device, cfg.amp)  # fp16 only
    # several processes: each takes its pairs of every batch; rank 0 writes (the old run, with --overwrite,
    # is removed only now that the model has loaded)
    d, writer, log = open_lm_run("rm", cfg, cfg.model, overwrite, log, resumed[1] if resumed else None)
    pad = tok.pad_token_id
    ckpt = StageCheckpoints("rm", cfg, d, opt, scaler, g, rm.trainable_state, lambda t: load_into(rm, to_layout(rm, t)),
                            data_digest([eval_pairs, train_pairs]),
                            cfg.epochs * math.ceil(len(train_pairs) / cfg.batch_size), writer)
    start = ckpt.restore(*resumed) if resumed else (0, 0)
    step = ckpt.step
    log(f"rm: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs"
        + (f"; resuming {cfg.out} after step {ckpt.step}/{ckpt.total_steps}" if resumed else ""))

    def minibatch(rows: Tensor, where: str) -> dict:
        loss_total, acc_total = 0.0, 0.0
        errors = Deferred(d.fsdp)  # fsdp: as many passes on every rank, a NaN raised after them
        # weights are shares of the whole batch (a rank may hold no row of a small last batch)
        for micro, real in lockstep(d.local(rows).split(cfg.micro_batch_size), d, rows[:1]):
            rc, rr = score_pairs(rm, [train_pairs[i] for i in micro.tolist()], pad, cfg.device)
            w = len(micro) / len(rows) if real else 0.0  # exact: the minibatch loss is the mean over its pairs
            loss = bradley_terry_loss(rc, rr)
            if not real:
                backward(loss * w, scaler)  # zero gradients, the same collectives
                continue
            errors.call(check_finite, "loss", loss.detach(), None, where)
            backward(loss * w, scaler)
            loss_total += w * float(loss.detach())
            acc_total += w * float(pairwise_accuracy(rc.detach(), rr.detach()))
        errors.raise_first()
        return {"loss": loss_total, "accuracy": acc_total}

    def logged(epoch: int, st: dict, grad_norm: float) -> None:
        nonlocal step
        step += 1
        both = d.all_reduce_(torch.tensor([st["loss"], st["accuracy"]], dtype=torch.float64)).tolist()
        st = {"loss": both[0], "accuracy": both[1]}
        fields, suffix = step_fields(grad_norm, scaler)
        writer.metrics({"step": step, "epoch": epoch, **st, **fields, "time": ckpt.elapsed()})
        log(f"rm step {step}  loss {st['loss']:.4f}  acc {st['accuracy']:.3f}" + suffix)

    with ckpt:  # SIGINT/SIGTERM: a checkpoint after the step in progress, then RunInterrupted;
        # after the last step the stage finishes (its final checkpoint, samples and summary), never killed half-way
        sgd_epochs([opt], params, cfg.epochs, ckpt.order(lambda: chunks(len(train_pairs), cfg.batch_size, g)),
                   cfg.max_grad_norm, None, minibatch, after_step=ckpt.after_step(logged), dist=d, scaler=scaler,
                   start=start)
        with gathered(rm), torch.inference_mode():  # fsdp: every rank scores every pair, the weights gathered
            def scores(ps):
                out = [score_pairs(rm, ps[i:i + cfg.micro_batch_size], pad, cfg.device) for i in range(0, len(ps), cfg.micro_batch_size)]
                return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
            tc, tr = scores(train_pairs)
            all_train = torch.cat([tc, tr])
            rm.score_mean.copy_(all_train.mean())
            rm.score_std.copy_(all_train.std().clamp(min=1e-6) if all_train.numel() > 1 else torch.ones(()))
            eval_acc, eval_loss = float("nan"), float("nan")
            if eval_pairs:
                ec, er = scores(eval_pairs)
                eval_acc, eval_loss = float(pairwise_accuracy(ec, er)), float(bradley_terry_loss(ec, er))
        d.barrier()
        state = rm.trainable_state()  # on every rank (fsdp: gathered from the shards)
        if d.main:
            checkpoint.save(Path(cfg.out) / "checkpoints", step, state,
                            {"stage": "rm", "version": CHECKPOINT_VERSION, "step": step}, keep=cfg.keep_checkpoints)
        summary = {"steps": step, "train_accuracy": float(pairwise_accuracy(tc, tr)), "eval_accuracy": eval_acc,
                   "eval_loss": eval_loss, "eval_pairs": len(eval_pairs), "score_mean": float(rm.score_mean),
                   "score_std": float(rm.score_std), "wall_time": ckpt.elapsed()}
        summary.update(scaler_summary(ckpt.skipped, scaler))
        # JSON has no NaN: the held-out statistics of a run without held-out pairs are written as null
        summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
        writer.metrics({"step": step, "final": True, **summary})
        if d.main:
            checkpoint.write_json_atomic(Path(cfg.out) / "summary.json", summary)
    log(f"rm: held-out pairwise accuracy {eval_acc:.3f} on {len(eval_pairs)} pairs" if eval_pairs
        else "rm: no held-out pairs (--eval-fraction 0)")
    if summary["score_std"] < FLAT_SCORE_STD and all_train.numel() > 1:  # normalising would amplify noise
        print(f"warning: the reward model's scores on its training pairs barely vary (std {summary['score_std']:.2g}, "
              f"train pairwise accuracy {summary['train_accuracy']:.3f}): it tells responses almost apart by nothing, "
              f"and its normalised scores multiply that noise by {1 / summary['score_std']:.0f} in PPO; check that "
              "chosen and rejected really differ, or train longer (--epochs, --lr)", file=sys.stderr)
    return summary


#: a score spread below this on the training pairs means the Bradley–Terry model separates nothing (a score
#: difference of 0.01 is a preference probability of 0.5025)
FLAT_SCORE_STD = 0.01
