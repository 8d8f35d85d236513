"""The math of the ladder, once, as pure torch functions.

Every rung (gym or language model) calls these and nothing else for its math. Conventions:

* Batched time series are ``[B, T]``: ``B`` parallel streams (envs, or sequences), ``T`` steps (env steps,
  or response tokens). ``mask`` is 1 where a step is real and trained on, 0 for padding or for the
  reset step that Gymnasium's NEXT_STEP autoreset inserts after an episode ends.
* ``terminated[b, t]`` — the episode ended at step t in a terminal state: no value after it.
  ``truncated[b, t]`` — the episode was cut at step t (time limit): the future is estimated by
  ``next_values[b, t]`` = V(final observation). Never a bare ``done`` in the math.
* ``next_values[b, t]`` is V(s_{t+1}) for the observation that *followed* step t (the final observation
  when the episode ended there, the next observation otherwise). At ``t = T-1`` it bootstraps the cut
  at the rollout boundary.
* Losses are returned as quantities to *minimise* (the negative of the objective J in MISSION.md).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "aggregate",
    "total_return", "reward_to_go", "gae",
    "vanilla_pg_loss", "importance_sampled_loss", "kl_penalty_loss", "clipped_loss", "value_loss",
    "kl_k1", "kl_k2", "kl_k3", "exact_kl", "KL_ESTIMATORS", "kl_estimate", "kl_ref_loss", "categorical_kl",
    "ppo_beta_update", "ziegler_beta_update",
    "conjugate_gradient", "flat_grad", "assign_flat", "fisher_vector_product", "fisher_vector_product_fn",
    "backtracking_line_search",
    "effective_sample_size", "explained_variance", "LineSearchResult",
    "rloo_baseline", "group_normalize", "importance_weight_stats", "behaviour_correction", "truncate_logits",
]


# --------------------------------------------------------------------------- masked statistics
def masked_sum(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    if mask is None:
        return x.sum() if dim is None else x.sum(dim)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1. An empty mask gives 0, never NaN."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries (Bessel-corrected when ``unbiased``); 0 for fewer than 2."""
    count = mask.sum() if mask is not None else torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (count - 1) if unbiased else count
    return sq / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Scale ``x`` to unit variance over the masked entries (and zero mean if ``shift_mean``).

    RLHF whitens rewards *without* the mean shift (keeps their sign) and advantages *with* it
    (DETAILS LM-10). With fewer than 2 entries there is no variance to divide by: ``x`` is returned
    unchanged (only centred when ``shift_mean``) instead of NaN. Masked-out entries keep their value.
    """
    mean = masked_mean(x, mask)
    if (mask.sum() if mask is not None else x.numel()) < 2:
        out = x - mean if shift_mean else x
    else:
        var = masked_var(x, mask)
        out = (x - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
    return torch.where(mask.bool(), out, x) if mask is not None else out


def aggregate(x: Tensor, mask: Tensor | None, mode: str = "token-mean", length: int | None = None) -> Tensor:
    """Reduce a ``[B, T]`` per-step loss to a scalar.

    ``token-mean`` averages over all real steps (long responses weigh more); ``seq-mean`` averages
    each sequence first, then over sequences (every sequence weighs the same) — the length bias
    of DETAILS LM-15; ``constant`` is Dr.GRPO's constant normaliser (Liu et al. 2025): the sum over real
    steps divided by B × ``length`` (the maximum response length, a constant of the run; None = T), so
    neither a sequence's length nor the batch's token count rescales its tokens' gradient. For the gym
    path (``T`` = 1 after flattening) all three agree. ``mask`` None: every step is real (the same values as
    an all-ones mask, bit for bit, without building and multiplying one — the gym's minibatches).
    """
    if mode == "token-mean":
        return masked_mean(x, mask)
    if mode == "seq-mean":
        per_seq = masked_mean(x, mask, dim=-1)  # [B]
        if mask is None:
            return per_seq.mean()
        has = (mask.sum(-1) > 0).to(x.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    if mode == "constant":
        rows = x.shape[0] if x.dim() > 1 else 1
        return masked_sum(x, mask) / (rows * (x.shape[-1] if length is None else length))
    raise ValueError(f"loss_agg must be 'token-mean', 'seq-mean' or 'constant', got {mode!r}")


# --------------------------------------------------------------------------- returns and advantages
def _continuation(terminated: Tensor, truncated: Tensor) -> Tensor:
    return 1.0 - torch.maximum(terminated, truncated).to(torch.get_default_dtype())


def reward_to_go(rewards: Tensor, terminated: Tensor, truncated: Tensor, next_values: Tensor | None = None,
                 gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go G_t = Σ_{t'≥t} γ^{t'-t} r_{t'} within each episode segment, ``[B, T]``.

    Where a segment is cut (truncation, or the rollout boundary at T-1) the tail is bootstrapped with
    γ·next_values (pass ``None`` for 0: no critic). Terminated steps never bootstrap.
    """
    B, T = rewards.shape
    if next_values is None:
        next_values = torch.zeros_like(rewards)
    terminated, truncated = terminated.to(rewards.dtype), truncated.to(rewards.dtype)
    cont = 1.0 - torch.maximum(terminated, truncated)
    # time-major and contiguous, everything but the recursion computed for all steps at once (the same
    # elementwise operations as step by step, so the same bits; half the time at T = 500)
    boot = (next_values * (1.0 - terminated)).T.contiguous()  # the bootstrap where a segment is cut
    cut, cont, r = (1.0 - cont).T.contiguous(), cont.T.contiguous(), rewards.T.contiguous()
    out = torch.empty_like(r)  # [T, B]
    following = boot[-1]  # bootstrap at the rollout boundary
    for t in reversed(range(T)):
        following = out[t] = r[t] + gamma * (cont[t] * following + cut[t] * boot[t])
    return out.T.contiguous()


def total_return(rewards: Tensor, terminated: Tensor, truncated: Tensor, mask: Tensor | None = None,
                 gamma: float = 1.0) -> Tensor:
    """R(τ) of the episode segment each step belongs to, broadcast to every step of it, ``[B, T]``.

    Rung 1 weighs every step by the return of its whole trajectory. A fixed-length rollout cuts episodes
    at its boundary; the segment inside the batch is the trajectory (no critic to bootstrap with), the
    choice Spinning Up's VPG makes with v=0. Steps masked out (autoreset steps) get γ times the value of
    the segment that follows them, which is harmless since they are not trained on.
    """
    rtg = reward_to_go(rewards * (mask if mask is not None else 1.0), terminated, truncated, None, gamma)
    B, T = rewards.shape
    ended = torch.maximum(terminated, truncated).to(torch.bool)
    if mask is not None:
        # A masked step (autoreset, also at t = 0 when the rollout resumes right after a done) is no part
        # of any episode: the step after it starts a new segment. Otherwise with γ < 1 that segment would
        # be read from the masked step's reward-to-go, i.e. scaled by one extra γ.
        ended = ended | (mask == 0)
    starts = torch.ones_like(ended)
    starts[:, 1:] = ended[:, :-1]  # a segment starts at t = 0 and after every end
    steps = torch.arange(T, device=rtg.device).expand(B, T)
    first = torch.where(starts, steps, torch.zeros_like(steps)).cummax(1).values  # each step's segment start
    return rtg.gather(1, first)


def gae(rewards: Tensor, values: Tensor, next_values: Tensor, terminated: Tensor, truncated: Tensor,
        gamma: float = 0.99, gae_lambda: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438), ``[B, T]`` each.

    δ_t = r_t + γ·(1 − terminated_t)·V(s_{t+1}) − V(s_t);  A_t = δ_t + γλ·(1 − done_t)·A_{t+1}.
    On truncation the bootstrap V(final obs) is kept but the λ-trace stops; on termination both stop.
    Returns ``(adv, ret)`` with ``ret = adv + values`` (the TD(λ) critic targets).
    λ = 1 with V = 0 is the discounted reward-to-go (tested).
    """
    B, T = rewards.shape
    term = terminated.to(rewards.dtype)
    cont = _continuation(terminated, truncated).to(rewards.dtype)
    delta = rewards + gamma * (1.0 - term) * next_values - values  # [B, T]
    adv = torch.empty_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        last = delta[:, t] + gamma * gae_lambda * cont[:, t] * last
        adv[:, t] = last
    return adv, adv + values


# --------------------------------------------------------------------------- surrogates (losses)
def vanilla_pg_loss(logp: Tensor, weights: Tensor, mask: Tensor | None = None, agg: str = "token-mean",
                    agg_len: int | None = None) -> Tensor:
    """Rungs 1–3: −E[Φ_t · log π(a_t|s_t)]; Φ_t is R(τ), R(τ)−b, or an advantage (no gradient through it).
    ``agg_len``: the ``length`` of :func:`aggregate`'s ``constant`` mode (every loss below takes it)."""
    return -aggregate(logp * weights.detach(), mask, agg, agg_len)


def importance_sampled_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, mask: Tensor | None = None,
                            agg: str = "token-mean", max_log_ratio: float = 20.0, agg_len: int | None = None) -> Tensor:
    """Rung 4: −E_{π_old}[π_θ/π_old · A]. At θ = θ_old its gradient is the vanilla one (tested).

    The log-ratio is clamped before ``exp`` (DETAILS LM-16) so one far-off sample cannot give inf.
    """
    ratio = torch.exp((logp - logp_old.detach()).clamp(-max_log_ratio, max_log_ratio))
    return -aggregate(ratio * adv.detach(), mask, agg, agg_len)


def kl_penalty_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, kl: Tensor, beta: float,
                    mask: Tensor | None = None, agg: str = "token-mean", agg_len: int | None = None) -> Tensor:
    """Rung 5 (PPO1): −(E[ratio·A] − β·KL(π_old, π_θ)); ``kl`` is per step (exact or an estimator)."""
    return (importance_sampled_loss(logp, logp_old, adv, mask, agg, agg_len=agg_len)
            + beta * aggregate(kl, mask, agg, agg_len))


def clipped_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, clip_coef: float, mask: Tensor | None = None,
                 agg: str = "token-mean", max_log_ratio: float = 20.0,
                 clip_coef_high: float | None = None, agg_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Rung 6 (PPO2): −E[min(r·A, clip(r, 1−ε, 1+ε)·A)]. Returns ``(loss, clip_fraction)``.

    ε = ∞ recovers the importance-sampled loss exactly (tested). ``clip_coef_high`` (DAPO's clip-higher)
    makes the range asymmetric, [1 − clip_coef, 1 + clip_coef_high]; None = symmetric.
    """
    ratio = torch.exp((logp - logp_old.detach()).clamp(-max_log_ratio, max_log_ratio))
    adv = adv.detach()
    unclipped = ratio * adv
    if clip_coef_high is None or clip_coef_high == clip_coef:
        clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef) * adv
        outside = (ratio - 1.0).abs() > clip_coef
    else:
        clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef_high) * adv
        outside = (ratio < 1.0 - clip_coef) | (ratio > 1.0 + clip_coef_high)
    loss = -aggregate(torch.minimum(unclipped, clipped), mask, agg, agg_len)
    clip_fraction = masked_mean(outside.to(logp.dtype), mask)
    return loss, clip_fraction.detach()


def value_loss(values: Tensor, ret: Tensor, values_old: Tensor | None = None, clip_coef: float | None = None,
               mask: Tensor | None = None, agg: str = "token-mean", agg_len: int | None = None) -> Tensor:
    """0.5·(V − R)², or the clipped form 0.5·max((V−R)², (V_old + clip(V−V_old, ±ε) − R)²) (DETAILS 5, LM-11)."""
    sq = (values - ret) ** 2
    if clip_coef is not None and values_old is not None:
        v_clipped = values_old + torch.clamp(values - values_old, -clip_coef, clip_coef)
        sq = torch.maximum(sq, (v_clipped - ret) ** 2)
    return 0.5 * aggregate(sq, mask, agg, agg_len)


# --------------------------------------------------------------------------- KL
def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = log π − log π_ref on samples from π: unbiased for KL(π‖π_ref), can be negative per sample."""
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = ½(log π − log π_ref)²: low variance, biased (Schulman, "Approximating KL divergence")."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = exp(−Δ) − 1 + Δ with Δ = log π − log π_ref, samples from π: unbiased and ≥ 0.

    With ``logp = logp_old`` and ``logp_ref = logp_new`` this is PPO's ``approx_kl`` = (ratio − 1) − log ratio.
    """
    delta = logp - logp_ref
    return torch.expm1(-delta) + delta


def exact_kl(p: torch.distributions.Distribution, q: torch.distributions.Distribution, reduce: str = "joint") -> Tensor:
    """KL(p‖q) per state. ``joint``: the KL of the whole action distribution, i.e. summed over its independent
    action dimensions when it has them (an ``Independent`` Gaussian's event dims, a multi-categorical's
    sub-actions). ``per-dim``: that sum divided by the number of those dimensions, the mean KL per action
    dimension (what sb3-contrib's TRPO bounds for Box actions: SB3's diagonal Gaussian is a plain ``Normal``
    whose per-dimension KL it averages with the batch). One dimension (a Categorical): both agree."""
    kl = torch.distributions.kl_divergence(p, q)
    if reduce == "joint":
        return kl
    if reduce == "per-dim":
        dists = getattr(p, "dists", None)  # MultiCategorical: independent sub-actions
        n = len(dists) if dists is not None else math.prod(p.event_shape)
        return kl / max(n, 1)
    raise ValueError(f"exact_kl reduce must be 'joint' or 'per-dim', got {reduce!r}")


def categorical_kl(logp_all: Tensor, logq_all: Tensor) -> Tensor:
    """Exact KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last dim of full log-probabilities ``[..., V]``
    (a vocabulary), ``[...]``."""
    return (logp_all.exp() * (logp_all - logq_all)).sum(-1)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(estimator: str, logp: Tensor, logp_ref: Tensor) -> Tensor:
    """The per-sample estimator ``k1`` | ``k2`` | ``k3`` of KL(π‖π_ref) on samples x ~ π (values: k1 and k3
    unbiased, k2 biased; their *gradients* are a different matter, see :func:`kl_ref_loss`)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    return KL_ESTIMATORS[estimator](logp, logp_ref)


def kl_ref_loss(logp: Tensor, logp_ref: Tensor, estimator: str, mask: Tensor | None = None,
                agg: str = "token-mean", agg_len: int | None = None) -> Tensor:
    """The KL-to-reference term placed in the loss (GRPO style; the caller multiplies by β):
    ``aggregate(k(log π_θ, log π_ref))`` with the gradient through log π_θ only. On samples x ~ π_θ
    (DETAILS 19; exact expectations tested in ``tests/test_lm_kl.py``), writing Δ = log π_θ − log π_ref:

    * k1: ∇k1 = ∇log π_θ, E[∇k1] = 0 — the term does nothing in expectation;
    * k2: ∇k2 = Δ·∇log π_θ, E[∇k2] = ∇KL(π_θ‖π_ref) — the reverse KL, as the reward placement;
    * k3: ∇k3 = (1 − π_ref/π_θ)·∇log π_θ, E[∇k3] = −Σ π_ref ∇log π_θ = ∇KL(π_ref‖π_θ) — the forward KL.

    Samples from π_old ≠ π_θ (a later epoch or minibatch) shift these expectations by the ratio π_θ/π_old.
    """
    return aggregate(kl_estimate(estimator, logp, logp_ref.detach()), mask, agg, agg_len)


# --------------------------------------------------------------------------- KL controllers
def ppo_beta_update(beta: float, kl: float, kl_target: float, factor: float = 2.0, tolerance: float = 1.5) -> float:
    """The adaptive penalty of the PPO paper (Schulman et al. 2017, §4), applied once per iteration:
    β ← β·2 if KL > 1.5·target; β ← β/2 if KL < target/1.5; unchanged otherwise."""
    if kl > tolerance * kl_target:
        return beta * factor
    if kl < kl_target / tolerance:
        return beta / factor
    return beta


def ziegler_beta_update(beta: float, kl: float, kl_target: float, n_steps: int, horizon: int) -> float:
    """Adaptive KL controller of Ziegler et al. 2019 (arXiv:1909.08593, §2.2):
    β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon). Needs horizon > n_steps/5: else a KL below
    target would make β zero or negative (a bonus for moving away from the reference)."""
    if 5 * horizon <= n_steps:
        raise ValueError(f"ziegler_beta_update needs horizon > n_steps/5 (β would turn ≤ 0), got horizon={horizon}, "
                         f"n_steps={n_steps}")
    error = min(max(kl / kl_target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


# --------------------------------------------------------------------------- trust region
def conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10) -> Tensor:
    """Solve A x = b for symmetric positive-definite A given only x ↦ A x (Hestenes & Stiefel)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def flat_grad(y: Tensor, params: Sequence[Tensor], **kwargs) -> Tensor:
    grads = torch.autograd.grad(y, params, **kwargs)
    return torch.cat([g.reshape(-1) for g in grads])


@torch.no_grad()
def assign_flat(params: Sequence[Tensor], vec: Tensor) -> None:
    """Write the flat vector ``vec`` into ``params`` in place, in order (``vector_to_parameters`` rebinds each
    parameter's ``.data`` instead, which cuts parameters that are views of shared storage off from it)."""
    off = 0
    for p in params:
        n = p.numel()
        p.copy_(vec[off:off + n].view_as(p))
        off += n
    if off != vec.numel():
        raise ValueError(f"assign_flat: {vec.numel()} values for {off} parameter entries")


def fisher_vector_product(kl_fn: Callable[[], Tensor], params: Sequence[Tensor], v: Tensor, damping: float = 0.1) -> Tensor:
    """F·v + damping·v, with F the Hessian of the mean KL(π_old‖π_θ) at θ = θ_old (which is the Fisher
    information there). Computed by double back-propagation, never forming F."""
    kl = kl_fn()
    g = flat_grad(kl, params, create_graph=True)
    hv = flat_grad(g @ v, params)
    return hv + damping * v


def fisher_vector_product_fn(kl_fn: Callable[[], Tensor], params: Sequence[Tensor],
                             damping: float = 0.1) -> Callable[[Tensor], Tensor]:
    """v ↦ :func:`fisher_vector_product` (kl_fn, params, v, damping) with the KL's forward and first backward
    done once: every product back-propagates only through the kept graph of ∇KL (bit for bit the same
    values; about half the cost of each product). For a batch whose graph fits in memory with it (the gym's);
    the LM recomputes per micro-batch instead. Drop the returned function to free the graph."""
    g = flat_grad(kl_fn(), params, create_graph=True)
    return lambda v: flat_grad(g @ v, params, retain_graph=True) + damping * v


class LineSearchResult(NamedTuple):
    accepted: bool
    step_fraction: float  # the fraction of the full step taken (0 when rejected)
    backtracks: int
    improvement: float
    kl: float


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], max_kl: float,
                             backtrack_coef: float = 0.8, max_backtracks: int = 10) -> LineSearchResult:
    """TRPO's line search: try step fractions 1, c, c², … (c = ``backtrack_coef``); accept the first whose
    surrogate improved (> 0) and whose mean KL ≤ ``max_kl`` (strictly δ, not Baselines' 1.5δ).

    ``evaluate(frac)`` applies θ_old + frac·step, returns ``(improvement, kl)``; the caller restores θ_old
    when nothing is accepted. ``max_backtracks`` = 0 means only the full step is tried (NPG-like).
    """
    frac = 1.0
    improvement, kl = float("nan"), float("nan")
    for i in range(max_backtracks + 1):
        improvement, kl = evaluate(frac)
        if math.isfinite(improvement) and math.isfinite(kl) and improvement > 0 and kl <= max_kl:
            return LineSearchResult(True, frac, i, improvement, kl)
        frac *= backtrack_coef
    return LineSearchResult(False, 0.0, max_backtracks, improvement, kl)


# --------------------------------------------------------------------------- diagnostics
def effective_sample_size(log_weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Kish's effective sample size of importance weights, as a fraction of the sample count:
    (Σw)² / (n·Σw²) ∈ (0, 1]; 1 when all weights are equal. Computed from log-weights, stably."""
    if mask is None:
        mask = torch.ones_like(log_weights)
    lw = torch.where(mask.bool(), log_weights, torch.full_like(log_weights, -float("inf")))
    n = mask.sum().clamp(min=1)
    log_s1 = torch.logsumexp(lw.reshape(-1), 0)
    log_s2 = torch.logsumexp(2 * lw.reshape(-1), 0)
    return torch.exp(2 * log_s1 - log_s2) / n


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 − Var[target − pred] / Var[target]: 1 is a perfect critic, ≤ 0 no better than a constant.
    NaN when the targets have no variance (nothing to explain), also when they differ only by rounding at the
    scale of the values (e.g. returns = advantages + values of equal scores: Var ~1e-33 gave −4e31)."""
    var_t = masked_var(target, mask)
    big = torch.maximum(target.abs(), pred.abs())
    if mask is not None:
        big = big * (mask != 0)
    rounding = (torch.finfo(var_t.dtype).eps * big.max()) ** 2 if big.numel() else 0.0
    if var_t <= rounding:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(target - pred, mask) / var_t


# --------------------------------------------------------------------------- sampling
def inverse_cdf_sample(cdf: Tensor, u: Tensor) -> Tensor:
    """Index drawn by inverting a cumulative distribution: ``#{k : F(k) ≤ u}`` for ``cdf`` ``[..., K]``
    (non-decreasing along the last dim) and ``u`` ``[..., 1]`` uniform on ``[0, F(K−1))``. A
    zero-probability event (a flat step of F) is never drawn; the clamp covers F(K−1) < u by rounding.
    One uniform per row instead of ``torch.multinomial``'s exponential draw per event; used by the gym
    Categorical and the LM sampler alike. Returns ``[...]``."""
    return torch.searchsorted(cdf, u.to(cdf.dtype), right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


# --------------------------------------------------------------------------- sequence baselines (LM rung 2)
# The rollout batch holds K samples of each prompt in consecutive rows: row g·K + j is sample j of prompt g.
def rloo_baseline(returns: Tensor, k: int) -> Tensor:
    """RLOO's leave-one-out baseline (Kool et al. 2019): b_i = mean of the other K−1 returns of the same
    prompt, ``returns`` ``[G·K]`` → ``[G·K]``. It does not depend on sample i, so E[(R_i − b_i)∇log π(y_i)]
    = ∇E[R] exactly (tested by enumeration). Needs K ≥ 2."""
    if k < 2 or returns.numel() % k:
        raise ValueError(f"rloo_baseline needs K ≥ 2 samples per prompt dividing {returns.numel()}, got K={k}")
    g = returns.reshape(-1, k)                               # [G, K]
    return ((g.sum(-1, keepdim=True) - g) / (k - 1)).reshape(-1)


def group_normalize(returns: Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024): (R_i − mean_group) / (std_group + ε), std the
    unbiased sample std of the K returns of the prompt (ε = 1e-4 as in TRL); ``scale_by_std=False`` is
    Dr.GRPO's (Liu et al. 2025) R_i − mean_group, without the division that weighs prompts by difficulty.
    ``returns`` ``[G·K]`` → ``[G·K]``. Needs K ≥ 2."""
    if k < 2 or returns.numel() % k:
        raise ValueError(f"group_normalize needs K ≥ 2 samples per prompt dividing {returns.numel()}, got K={k}")
    g = returns.reshape(-1, k)                               # [G, K]
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def importance_weight_stats(log_weights: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Variance of the importance weights w = exp(log w) over the real entries and their effective sample
    size (:func:`effective_sample_size`): rung 4's diagnostics, ``[...]`` → two scalars."""
    w = torch.exp(log_weights.clamp(-20, 20))
    return masked_var(w, mask), effective_sample_size(log_weights, mask)


# --------------------------------------------------------------------------- off-policy rollouts (rung 4)
def behaviour_correction(logp_old: Tensor, logp_behaviour: Tensor, mask: Tensor, mode: str,
                         cap: float) -> tuple[Tensor, Tensor]:
    """Weights for samples drawn by a behaviour policy μ (an older policy, another engine) but trained as if
    from π_old: per token w = π_old(y_t)/μ(y_t) of the sampled token. Returns ``(weight, mask)`` ``[B, T]``;
    the weight multiplies the advantage (for w ≥ 0, w·min(r·A, clip(r)·A) = min(r·wA, clip(r)·wA), so every
    surrogate takes it the same way) and the mask replaces the token mask.

    * ``none`` — w = 1: the mismatch ignored (biased; what a trainer that trusts its rollout engine does);
    * ``truncate`` — min(w, C): truncated importance sampling (Ionides 2008; the TIS of large-scale RLHF
      trainers): bias traded for a variance bounded by C²;
    * ``mask`` — w where w ≤ C, the token dropped (mask 0) where w > C.

    μ = π_old (lag 0) gives w = 1 exactly, so the corrected estimator equals the on-policy one (tested)."""
    if mode not in ("none", "truncate", "mask"):
        raise ValueError(f"behaviour_correction mode must be none, truncate or mask, got {mode!r}")
    if mode == "none":
        return torch.ones_like(logp_old), mask
    w = torch.exp((logp_old - logp_behaviour).clamp(max=50.0)) * mask
    if mode == "truncate":
        return w.clamp(max=cap), mask
    keep = (w <= cap).to(mask.dtype) * mask
    return w * keep, keep


# --------------------------------------------------------------------------- top-k / top-p (nucleus) truncation
def truncate_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, keep: Tensor | None = None) -> Tensor:
    """``logits`` ``[..., V]`` (already divided by the temperature) with −inf outside the truncated support:
    the ``top_k`` largest (0: all; ties with the k-th kept), then, of those, the smallest most-probable set
    whose probability reaches ``top_p`` (1: all; the most probable token always kept). ``keep`` ``[...]``:
    token ids kept whatever their rank — the scored token of a training forward, so that a token drawn at a
    rounding-level boundary of the sampler's support never gets log-prob −inf. softmax of the result IS the
    sampling distribution, and log-probs of it make the ratios and the KL exact for truncated sampling."""
    if top_k <= 0 and top_p >= 1.0:
        return logits
    remove = torch.zeros_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        remove |= logits < kth
    if top_p < 1.0:
        x = logits.masked_fill(remove, -float("inf"))
        sorted_x, order = x.sort(-1, descending=True)
        probs = torch.softmax(sorted_x.float(), -1)
        before = probs.cumsum(-1) - probs  # mass of the more probable tokens
        remove |= torch.zeros_like(remove).scatter(-1, order, before >= top_p)
    if keep is not None:
        remove.scatter_(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(remove, -float("inf"))
