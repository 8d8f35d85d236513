"""The ladder as independent choices: advantage estimator (Φ_t) × surrogate, shared by the gym and LM paths.

A rung is a point in this grid (see :mod:`proxrl.rungs`); everything here is a thin dispatch onto
:mod:`proxrl.core`, so a new rung is a new row in the rung table, not new math.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import core
from .batch import Batch

WEIGHTS = ("return", "return-baseline", "gae")
SURROGATES = ("vanilla", "is", "kl-penalty", "clip")
BASELINES = ("none", "batch-mean", "rloo", "group-norm")


def estimate_advantages(batch: Batch, weight: str, gamma: float, gae_lambda: float) -> Batch:
    """Fill ``adv`` (the weight Φ_t on ∇log π) and ``ret`` (critic targets, when there is a critic).

    * ``return`` — Φ_t = R(τ), the return of the whole episode segment (rung 1).
    * ``return-baseline`` — Φ_t = R(τ) − b with b the mean of R(τ) over the batch's real steps (rung 2).
    * ``gae`` — Φ_t = GAE(γ, λ) with the learned V(s) (rungs 3–7); λ = 1 is discounted reward-to-go − V.
    """
    if weight == "return" or weight == "return-baseline":
        adv = core.total_return(batch.rewards, batch.terminated, batch.truncated, batch.mask, gamma)
        if weight == "return-baseline":
            adv = adv - core.masked_mean(adv, batch.mask)
        ret = core.reward_to_go(batch.rewards, batch.terminated, batch.truncated, batch.next_values, gamma)
        return batch.replace(adv=adv, ret=ret)
    if weight == "gae":
        if batch.values is None or batch.next_values is None:
            raise ValueError("the 'gae' advantage estimator needs a critic: batch.values and batch.next_values")
        adv, ret = core.gae(batch.rewards, batch.values, batch.next_values, batch.terminated, batch.truncated,
                            gamma, gae_lambda)
        return batch.replace(adv=adv, ret=ret)
    raise ValueError(f"unknown advantage estimator {weight!r}; choose one of {WEIGHTS}")


def sequence_advantages(returns: Tensor, baseline: str, k: int = 1, scale_by_std: bool = True) -> Tensor:
    """The weight of every token of a response from the sequence returns ``[N]`` (LM rungs 1–2), ``[N]``:
    ``none`` R_i; ``batch-mean`` R_i − mean over the batch (the sample itself included: biased by a factor
    (N−1)/N, tested); ``rloo`` R_i − mean of the other K−1 samples of its prompt; ``group-norm``
    (R_i − group mean) / group std (``scale_by_std=False``: no division, Dr.GRPO). Rows are grouped by
    prompt, K consecutive rows each (:func:`proxrl.core.rloo_baseline`)."""
    if baseline == "none":
        return returns
    if baseline == "batch-mean":
        return returns - returns.mean()
    if baseline == "rloo":
        return returns - core.rloo_baseline(returns, k)
    if baseline == "group-norm":
        return core.group_normalize(returns, k, scale_by_std)
    raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")


def normalize_advantages(adv: Tensor, mask: Optional[Tensor], mode: str) -> Tensor:
    """``off`` | ``scale`` (divide by the std, keep the mean: rung 1 keeps its all-positive weights)
    | ``whiten`` (zero mean, unit std). ``mask`` None: every entry is real."""
    if mode == "off":
        return adv
    if mode == "scale":
        count = mask.sum() if mask is not None else adv.numel()
        std = torch.sqrt(core.masked_var(adv, mask) + 1e-8) if count >= 2 else torch.ones((), dtype=adv.dtype)
        return adv / std
    if mode == "whiten":
        return core.masked_whiten(adv, mask, shift_mean=True)
    raise ValueError(f"norm_adv must be off, scale or whiten, got {mode!r}")


def surrogate_loss(surrogate: str, logp: Tensor, logp_old: Tensor, adv: Tensor, mask: Optional[Tensor], *,
                   clip_coef: float = 0.2, beta: float = 0.0, kl: Optional[Tensor] = None,
                   agg: str = "token-mean", ratio_stats: bool = True, kl_stats: bool = True,
                   clip_coef_high: Optional[float] = None, agg_len: Optional[int] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of a rung plus its diagnostics (all detached scalars).

    ``kl`` is the per-step KL(π_old‖π_θ) used by the penalty (exact on the gym path, k3 on tokens).
    Diagnostics: ``approx_kl`` (k3 of old vs new; ``kl_stats=False`` skips it), ``ratio_mean``, ``ratio_max``,
    ``clip_fraction``.
    ``clip_coef_high`` (clip only): the upper bound of an asymmetric range [1 − clip_coef, 1 + clip_coef_high].
    ``agg_len``: the constant length of ``agg='constant'`` (:func:`proxrl.core.aggregate`).
    """
    log_ratio = logp - logp_old
    if surrogate == "vanilla":
        loss = core.vanilla_pg_loss(logp, adv, mask, agg, agg_len)
        clip_fraction = None
    elif surrogate == "is":
        loss = core.importance_sampled_loss(logp, logp_old, adv, mask, agg, agg_len=agg_len)
        clip_fraction = None
    elif surrogate == "kl-penalty":
        if kl is None:
            kl = core.kl_k3(logp_old, logp)
        loss = core.kl_penalty_loss(logp, logp_old, adv, kl, beta, mask, agg, agg_len)
        clip_fraction = None
    elif surrogate == "clip":
        loss, clip_fraction = core.clipped_loss(logp, logp_old, adv, clip_coef, mask, agg,
                                                  clip_coef_high=clip_coef_high, agg_len=agg_len)
    else:
        raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {SURROGATES}")
    with torch.no_grad():
        stats = {"approx_kl": core.masked_mean(core.kl_k3(logp_old, logp), mask)} if kl_stats else {}
        if ratio_stats:  # ``ratio_stats=False`` (gym minibatch loop, which discards them) skips ratio_mean/max
            ratio = torch.exp(log_ratio.clamp(-20, 20))
            stats["ratio_mean"] = core.masked_mean(ratio, mask)
            if mask is None:
                stats["ratio_max"] = ratio.max() if ratio.numel() else torch.tensor(1.0)
            else:
                m = mask.bool()
                stats["ratio_max"] = ratio[m].max() if m.any() else torch.tensor(1.0)
        if clip_fraction is not None:
            stats["clip_fraction"] = clip_fraction
    return loss, stats
