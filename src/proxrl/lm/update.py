"""What optimises on a token :class:`~proxrl.batch.Batch`: ``update_epochs`` × shuffled minibatches (one
optimizer step each, :func:`proxrl.run.sgd.sgd_epochs`, the loop every SGD stage shares) × micro-batches
(gradient accumulation, each micro loss weighted by its share of the minibatch's tokens or sequences so the
micro-batch size never changes the result, LM-12), with :func:`proxrl.objective.surrogate_loss` and
:func:`proxrl.core.value_loss` (clipped). After the epochs, for the rung-5 penalty, the exact
per-token KL(π_old‖π_θ) over the vocabulary on the whole batch (as on the gym side, DETAILS 9).
"""

from __future__ import annotations

import math

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import core, objective
from ..batch import Batch
from ..run.fsdp import Deferred, gathered, lockstep
from ..run.guards import check_finite
from ..run.sgd import backward, minibatches, sgd_epochs
from .policy import LMPolicy


def micro_weight(micro_mask: Tensor, minibatch_mask: Tensor, agg: str) -> Tensor:
    """Share of a micro-batch in its minibatch's loss, so Σ_micro weight·loss_micro = loss_minibatch exactly
    for token-mean (share of real tokens), seq-mean (share of non-empty sequences) and constant (share of rows)."""
    if agg == "token-mean":
        return micro_mask.sum() / minibatch_mask.sum().clamp(min=1)
    if agg == "constant":
        return micro_mask.new_tensor(micro_mask.shape[0]) / minibatch_mask.shape[0]
    return (micro_mask.sum(-1) > 0).sum() / (minibatch_mask.sum(-1) > 0).sum().clamp(min=1)


def accumulate(policy: LMPolicy, cfg, batch: Batch, ids: Tensor, mask: Tensor, rows: Tensor, penalty_beta: float,
               update: int, where: str, dist=None, kl_coef: float = 0.0, scaler=None) -> dict[str, float]:
    """Backward of one minibatch ``rows``, micro-batch by micro-batch (no optimizer step); returns the
    minibatch's statistics (weighted means; ``ratio_max`` a max). On several processes (``dist``) this
    rank takes its part of ``rows``; each micro loss keeps its weight in the *global* minibatch, so the
    gradients summed over ranks are the single-process gradient, and so are the statistics summed. With
    ``cfg.kl_in == 'loss'`` the loss gets ``kl_coef``·:func:`proxrl.core.kl_ref_loss` (GRPO's placement).
    ``scaler`` (fp16): each micro loss is multiplied by the gradient scaler's scale before backward."""
    R = batch.shape[1]
    agg_len = cfg.response_length if cfg.loss_agg == "constant" else None
    kl_in_loss = getattr(cfg, "kl_in", "reward") == "loss"
    mb_mask = batch.mask[rows]
    sums: dict[str, float] = {}
    critic = cfg.critic != "none"  # the critic-free rungs (pg, pg-baseline, rloo, grpo) train no value
    mine = dist.local(rows) if dist is not None else rows
    # fsdp: every rank runs as many (collective) passes, a NaN is raised after them (a rank may hold no row
    # of a small last batch, or one micro-batch fewer: it runs zero-weight passes)
    errors = Deferred(dist is not None and dist.fsdp)
    for micro, real in lockstep(mine.split(cfg.micro_batch_size), dist, rows[:1]):
        m = batch.mask[micro]
        w = micro_weight(m, mb_mask, cfg.loss_agg) if real else torch.zeros((), dtype=batch.mask.dtype)
        logp, v, ent = policy(ids[micro], mask[micro], R, cfg.temperature, values=critic,
                              entropy=True, entropy_grad=cfg.ent_coef > 0)
        pg_loss, st = objective.surrogate_loss(cfg.surrogate, logp, batch.logp_old[micro], batch.adv[micro], m,
                                               clip_coef=cfg.clip_coef, beta=penalty_beta, agg=cfg.loss_agg,
                                               clip_coef_high=cfg.clip_coef_high, agg_len=agg_len)
        if kl_in_loss:
            st["kl_ref_loss"] = core.kl_ref_loss(logp, batch.logp_ref[micro], cfg.kl_estimator, m, cfg.loss_agg, agg_len)
            pg_loss = pg_loss + kl_coef * st["kl_ref_loss"]
        ent_mean = core.aggregate(ent, m, cfg.loss_agg, agg_len)
        if critic:
            v_loss = core.value_loss(v, batch.ret[micro], batch.values[micro], cfg.vf_clip, m, cfg.loss_agg, agg_len)
            loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent_mean
        else:
            v_loss = torch.zeros((), dtype=pg_loss.dtype)
            loss = pg_loss - cfg.ent_coef * ent_mean
        if not real:
            backward(loss * w, scaler)  # zero gradients, the same collectives
            continue
        for name, x in (("policy loss", pg_loss), ("value loss", v_loss), ("entropy", ent_mean)):
            errors.call(check_finite, name, x.detach(), update, where)
        backward(loss * w, scaler)
        wf = float(w)
        for k, val in {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": ent_mean, **st}.items():
            if k == "ratio_max":
                sums[k] = max(sums.get(k, 0.0), float(val.detach()))
            else:
                sums[k] = sums.get(k, 0.0) + wf * float(val.detach())
    errors.raise_first()
    return sums


def sgd_update(policy: LMPolicy, optimizer: torch.optim.Optimizer, cfg, batch: Batch, ids: Tensor, mask: Tensor,
               penalty_beta: float, shuffle: torch.Generator, update: int, dist=None,
               kl_coef: float = 0.0, scaler=None) -> dict[str, float]:
    """``update_epochs`` × ``num_minibatches`` optimizer steps on the batch; returns the mean of each
    minibatch statistic over the steps (``ratio_max``: the max) and the mean gradient norm. With ``dist``
    every minibatch of the one global permutation is split over the ranks (gradients summed). With a
    gradient ``scaler`` (fp16) also ``steps_skipped`` (steps whose gradients overflowed, skipped by the
    scaler; the mean gradient norm is over the others) and ``loss_scale`` (the scale after the update)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    B = ids.shape[0]
    res = sgd_epochs([optimizer], params, cfg.update_epochs, lambda: minibatches(B, cfg.num_minibatches, shuffle),
                     cfg.max_grad_norm, update,
                     lambda rows, where: accumulate(policy, cfg, batch, ids, mask, rows, penalty_beta, update, where,
                                                    dist, kl_coef, scaler),
                     dist=dist, scaler=scaler)
    totals: dict[str, float] = {}
    for sums in res.stats:
        for k, v in sums.items():
            totals[k] = max(totals.get(k, 0.0), v) if k == "ratio_max" else totals.get(k, 0.0) + v
    if dist is not None and dist.on:  # this rank's shares → the batch's statistics
        # the keys every rank saw: a rank that held no row of any minibatch (1-row minibatches) has none, and
        # collectives decided by local keys would differ between ranks (a deadlock until gloo's timeout)
        seen = sorted(set().union(*dist.gather_objects(sorted(totals))))
        totals.update({k: totals.get(k, 0.0) for k in seen})
        keys = [k for k in seen if k != "ratio_max"]
        summed = dist.all_reduce_(torch.tensor([totals[k] for k in keys], dtype=torch.float64))
        totals.update(zip(keys, summed.tolist()))
        if "ratio_max" in seen:
            totals["ratio_max"] = float(dist.all_reduce_(torch.tensor([totals["ratio_max"]], dtype=torch.float64), "max"))
    n = max(len(res.stats), 1)
    out = {k: (v if k == "ratio_max" else v / n) for k, v in totals.items()}
    norms = [g for g in res.grad_norms if not math.isnan(g)]  # NaN: a step the scaler skipped
    out["grad_norm"] = sum(norms) / len(norms) if norms else None  # None: every step skipped by the scaler
    if scaler is not None:
        out["steps_skipped"] = res.steps_skipped
        out["loss_scale"] = float(scaler.get_scale())
    return out


@contextmanager
def swapped(params: list[nn.Parameter], values: list[Tensor]):
    """Temporarily load ``values`` into ``params`` (no autograd), restoring the current ones on exit."""
    current = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, current):
                p.copy_(v)


@torch.no_grad()
def exact_kl_to_old(policy: LMPolicy, params: list[nn.Parameter], old_values: list[Tensor], ids: Tensor,
                    mask: Tensor, resp_mask: Tensor, temperature: float, chunk: int, dist=None) -> float:
    """Mean over response tokens of the exact KL(π_old(·|s_t) ‖ π_θ(·|s_t)) over the vocabulary, π_old
    given by ``old_values`` of the trainable ``params`` (the weights before the update): chunk by chunk,
    one forward with the current weights and one with the old ones (each rank its rows, summed)."""
    R = resp_mask.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    mine = dist.shard(ids.shape[0]) if dist is not None and dist.on else slice(0, ids.shape[0])
    pieces = torch.arange(mine.start, mine.stop).split(chunk)
    for sl, real in lockstep(pieces, dist, torch.arange(1)):  # fsdp: as many sharded forwards on every rank
        new = policy.log_softmax(ids[sl], mask[sl], R, temperature)   # [b, R, V]
        with swapped(params, old_values):
            old = policy.log_softmax(ids[sl], mask[sl], R, temperature)
        if real:
            kl = (old.exp() * (old - new)).sum(-1)                       # [b, R]
            total += (kl * resp_mask[sl].to(kl.dtype)).sum().double()
    if dist is not None:
        dist.all_reduce_(total.view(1))
    return float(total / resp_mask.sum().clamp(min=1))


@torch.no_grad()
def importance_weights_after(policy: LMPolicy, ids: Tensor, mask: Tensor, batch: Batch, temperature: float,
                             chunk: int) -> dict[str, float]:
    """Rung 4's diagnostics after the update, on the whole batch: the variance of the per-token weights
    w = π_θ/π_old of the sampled tokens and their effective sample size (Kish, a fraction of the tokens), and
    ``approx_kl_after``, the mean k3 of KL(π_old‖π_θ) on them (the in-update ``approx_kl`` of a single-step
    update is measured before its step, so always 0)."""
    R = batch.shape[1]
    with gathered(policy):
        logp = torch.cat([policy(ids[i:i + chunk], mask[i:i + chunk], R, temperature, values=False, entropy=False)[0]
                          for i in range(0, ids.shape[0], chunk)])
    var, ess = core.importance_weight_stats(logp - batch.logp_old, batch.mask)
    kl = core.masked_mean(core.kl_k3(batch.logp_old, logp), batch.mask)
    return {"is_weight_var": float(var), "ess": float(ess), "approx_kl_after": float(kl)}
