"""Rung 7 on tokens (``rlhf train --algo trpo``): TRPO's trust-region step on a token
:class:`~proxrl.batch.Batch`, from the same core as the gym's (Schulman et al. 2015, arXiv:1502.05477, App. C).

* **surrogate** J(θ) = aggregate(π_θ/π_old · A) over the response tokens (``loss_agg``), minus
  β·:func:`proxrl.core.kl_ref_loss` with ``--kl-in loss``; its gradient g at θ_old.
* **Fisher-vector products** F v: the Hessian-vector product (:func:`proxrl.core.fisher_vector_product`) of the
  mean per-token exact KL(π_old‖π_θ) over the vocabulary, written KL(stopgrad(π_θ)‖π_θ) from one forward —
  0 in value and, at θ = θ_old (where every F v of the solve is taken), exactly the Hessian of
  KL(π_old‖π_θ), i.e. the Fisher. Nothing of π_old is stored for it.
* **step** s ≈ (F + λI)⁻¹ g by conjugate gradient (``cg_iters``, damping λ = ``cg_damping``), scaled so that
  ½ sᵀ F s = δ (``max_kl``; F undamped: the quadratic model of the KL itself).
* **line search** (:func:`proxrl.core.backtracking_line_search`): fractions 1, c, c², … of the step; accepted
  only when the mean per-token exact KL(π_old‖π_θ) ≤ δ AND the surrogate improved; otherwise the weights are
  put back and the update says so (``ls_accepted`` false, ``ls_backtracks``). π_old's log-softmax is
  recomputed with the old weights swapped in, chunk by chunk (no [B, R, V] tensor kept).

Every pass runs on micro-batches of ``micro_batch_size`` rows, weighted by their share of the batch
(:func:`proxrl.lm.update.micro_weight`), so memory is that of one micro-batch. The parameters are the trainable
weights of the policy LM (LoRA adapters keep F v cheap); critic-free (advantages from the batch or group
baseline: a value head trained by SGD on the same trunk would move the policy outside the trust region).
Cost of an update: 1 forward+backward (g), ``cg_iters`` + 1 double-backward passes (F v, with PyTorch's math
attention kernel: the fused ones have no double backward), 2 no-grad forwards per line-search trial.

On several processes (``--parallel ddp``; every rank holds the whole batch) each rank runs the passes over its
share of the rows, still weighted by their share of the whole batch, and each pass's result is summed over the
ranks in one collective (:meth:`~proxrl.run.dist.Dist.sum_step`, which also agrees on an error): the gradient
g and J(θ_old), every Fisher-vector product, and the four sums of each line-search evaluation. The conjugate
gradient and every line-search decision then run on identical numbers on every rank, so every rank takes the
same step — the single-process step up to float summation order.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .. import core
from ..batch import Batch
from ..run.guards import check_finite
from .policy import LMPolicy
from .update import micro_weight, swapped


def sdpa_math():
    """PyTorch's math attention kernel: the fused (flash, memory-efficient) kernels implement no double
    backward, which every Fisher-vector product needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def policy_parameters(policy: LMPolicy) -> list[nn.Parameter]:
    """The trainable weights of the policy LM (LoRA adapters, or the trained weights): what the step moves.
    The value head is not among them (the trust-region rung trains no critic)."""
    return [p for p in policy.lm.parameters() if p.requires_grad]


def get_flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def set_flat(params: list[nn.Parameter], flat: Tensor) -> None:
    """Copy ``flat`` into ``params`` in place (their storage and identity kept: optimizer, tied weights)."""
    i = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[i:i + n].view_as(p))
        i += n


class _Passes:
    """The micro-batched passes over one token batch (the batch is one minibatch)."""

    def __init__(self, policy: LMPolicy, cfg, batch: Batch, ids: Tensor, mask: Tensor, kl_coef: float, dist=None):
        self.policy, self.cfg, self.batch, self.ids, self.mask, self.kl_coef = policy, cfg, batch, ids, mask, kl_coef
        self.R = batch.shape[1]
        self.dist = dist if dist is not None and dist.on else None
        rows = self.dist.shard(batch.shape[0]) if self.dist is not None else slice(0, batch.shape[0])
        self.micros = list(torch.arange(rows.start, rows.stop, device=batch.mask.device).split(cfg.micro_batch_size))
        self.n_tokens = batch.mask.sum().clamp(min=1)
        self.agg_len = cfg.response_length if cfg.loss_agg == "constant" else None
        self.kl_in_loss = getattr(cfg, "kl_in", "reward") == "loss"

    def log_softmax(self, micro: Tensor) -> Tensor:
        return self.policy.log_softmax(self.ids[micro], self.mask[micro], self.R, self.cfg.temperature)  # [b, R, V]

    def surrogate(self, micro: Tensor, logp_all: Tensor) -> tuple[Tensor, Tensor]:
        """(J of the micro-batch, log π_θ of its sampled tokens)."""
        b, cfg = self.batch, self.cfg
        m = b.mask[micro]
        logp = logp_all.gather(-1, b.actions[micro].unsqueeze(-1)).squeeze(-1)
        j = -core.importance_sampled_loss(logp, b.logp_old[micro], b.adv[micro], m, cfg.loss_agg, agg_len=self.agg_len)
        if self.kl_in_loss:
            j = j - self.kl_coef * core.kl_ref_loss(logp, b.logp_ref[micro], cfg.kl_estimator, m, cfg.loss_agg,
                                                    self.agg_len)
        return j, logp

    def weight(self, micro: Tensor) -> Tensor:
        return micro_weight(self.batch.mask[micro], self.batch.mask, self.cfg.loss_agg)

    def summed(self, run, like: Tensor) -> Tensor:
        """``run()`` (this rank's part of a pass: a flat tensor like ``like``), summed over the ranks in one
        collective that also agrees on an error — a rank that fails stops every rank with its line."""
        if self.dist is None:
            return run()
        err, out = None, torch.zeros_like(like)
        try:
            out = run()
        except Exception as e:  # noqa: BLE001 - agreed on by all ranks, then re-raised
            err = e
        self.dist.sum_step(err, out, {}, [])
        return out

    def gradient(self, params: list[nn.Parameter]) -> tuple[Tensor, float]:
        """g = ∇J at the current weights (θ_old) and J there."""
        # [g, J] in float64 (J's sums decide the line search; the micro-batch gradients are added in float64 too)
        like = torch.zeros(sum(p.numel() for p in params) + 1, dtype=torch.float64, device=params[0].device)

        def run() -> Tensor:  # this rank's micro-batches
            out = torch.zeros_like(like)
            for micro in self.micros:
                jm, _ = self.surrogate(micro, self.log_softmax(micro))
                w = self.weight(micro)
                out[:-1] += core.flat_grad(jm * w, params)
                out[-1] += (jm * w).detach().double()
            return out

        out = self.summed(run, like)
        return out[:-1].to(params[0].dtype), float(out[-1])

    def fvp(self, params: list[nn.Parameter], v: Tensor) -> Tensor:
        """F v, F the Hessian at θ_old of the mean per-token KL(π_old‖π_θ) over the batch (undamped)."""
        def run() -> Tensor:
            out = torch.zeros_like(v)
            for micro in self.micros:
                m = self.batch.mask[micro]

                def kl_fn(micro=micro, m=m) -> Tensor:
                    lp = self.log_softmax(micro)
                    return core.masked_sum(core.categorical_kl(lp.detach(), lp), m) / self.n_tokens

                with sdpa_math():  # the fused attention kernels have no double backward
                    out += core.fisher_vector_product(kl_fn, params, v, damping=0.0)
            return out

        return self.summed(run, v)

    @torch.no_grad()
    def evaluate(self, params: list[nn.Parameter], old_values: list[Tensor]) -> dict[str, float]:
        """At the current weights: J, the mean per-token exact KL(π_old‖π_θ) (π_old = ``old_values``), the mean
        k3 of the sampled tokens (``approx_kl``) and the entropy."""
        def run() -> Tensor:  # [J, Σ KL, Σ k3, Σ entropy] over this rank's micro-batches
            out = torch.zeros(4, dtype=torch.float64, device=self.batch.mask.device)
            for micro in self.micros:
                m = self.batch.mask[micro]
                new = self.log_softmax(micro)
                with swapped(params, old_values):
                    old = self.log_softmax(micro)
                jm, logp = self.surrogate(micro, new)
                out += torch.stack([jm * self.weight(micro), core.masked_sum(core.categorical_kl(old, new), m),
                                    core.masked_sum(core.kl_k3(self.batch.logp_old[micro], logp), m),
                                    core.masked_sum(-(new.exp() * new).sum(-1), m)]).double()
            return out

        j, kl, k3, ent = self.summed(run, torch.zeros(4, dtype=torch.float64, device=self.batch.mask.device)).tolist()
        n = float(self.n_tokens)
        return {"j": j, "kl": kl / n, "approx_kl": k3 / n, "entropy": ent / n}


class NaturalStep(NamedTuple):
    full_step: Tensor     # the step scaled to ½ sᵀF s = δ (zeros when there is none)
    j0: float             # J(θ_old)
    grad_norm: float
    shs: float            # ½ sᵀF s of the unscaled CG solution
    expected_improvement: float  # g · full_step


def natural_step(passes: _Passes, params: list[nn.Parameter], update: Optional[int]) -> NaturalStep:
    """g, s = CG((F + λI) s = g), and s scaled so that ½ sᵀ F s = δ."""
    cfg = passes.cfg
    g, j0 = passes.gradient(params)
    check_finite("policy gradient", g, update)
    damping = cfg.cg_damping
    gg = float(g @ g)
    s = core.conjugate_gradient(lambda v: passes.fvp(params, v) + damping * v, g, cfg.cg_iters,
                                residual_tol=1e-10 * gg)  # relative: LoRA gradients can be tiny
    shs = float(0.5 * (s @ passes.fvp(params, s)))
    if not (math.isfinite(shs) and shs > 0):
        return NaturalStep(torch.zeros_like(g), j0, math.sqrt(gg), shs, 0.0)
    full = s * math.sqrt(cfg.max_kl / shs)
    return NaturalStep(full, j0, math.sqrt(gg), shs, float(g @ full))


def line_search(passes: _Passes, params: list[nn.Parameter], theta_old: Tensor, full_step: Tensor,
                j0: float) -> tuple[core.LineSearchResult, dict[str, float]]:
    """TRPO's backtracking line search along ``full_step`` from ``theta_old``; leaves the weights at the
    accepted point, or at ``theta_old`` when nothing is accepted. Returns the result and the evaluation at
    the accepted point (at θ_old: KL 0, when rejected)."""
    cfg = passes.cfg
    n = [p.numel() for p in params]
    old_values = [t.view_as(p) for t, p in zip(theta_old.split(n), params)]
    last: dict[str, float] = {}

    def evaluate(frac: float) -> tuple[float, float]:
        set_flat(params, theta_old + frac * full_step)
        last.clear()
        last.update(passes.evaluate(params, old_values))
        return last["j"] - j0, last["kl"]

    res = core.backtracking_line_search(evaluate, cfg.max_kl, cfg.backtrack_coef, cfg.backtrack_iters)
    if not res.accepted:  # restored and logged, never silent (DETAILS 16)
        set_flat(params, theta_old)
        last = passes.evaluate(params, old_values)
    return res, last


def trust_region_update(policy: LMPolicy, cfg, batch: Batch, ids: Tensor, mask: Tensor, update: int,
                        kl_coef: float = 0.0, dist=None) -> dict[str, float]:
    """One TRPO update on the token batch (see the module docstring); returns its metrics. ``dist``: several
    processes, each holding the whole batch (each runs its rows' passes; the sums are exchanged)."""
    params = policy_parameters(policy)
    passes = _Passes(policy, cfg, batch, ids, mask, kl_coef, dist)
    theta_old = get_flat(params).clone()
    step = natural_step(passes, params, update)
    out: dict = {"grad_norm": step.grad_norm, "expected_improvement": step.expected_improvement,
                 "value_loss": 0.0, "clip_fraction": 0.0}
    if step.expected_improvement > 0:
        res, at = line_search(passes, params, theta_old, step.full_step, step.j0)
        out.update(ls_accepted=res.accepted, ls_backtracks=res.backtracks, ls_step_fraction=res.step_fraction,
                   ls_improvement=res.improvement if res.accepted else 0.0)
    else:  # no ascent direction (zero advantages, or no curvature): nothing to search
        at = {"j": step.j0, "kl": 0.0, "approx_kl": 0.0, "entropy": float("nan")}
        with torch.no_grad():
            at["entropy"] = passes.evaluate(params, [p.detach().clone() for p in params])["entropy"]
        out.update(ls_accepted=False, ls_backtracks=0, ls_step_fraction=0.0, ls_improvement=0.0)
    out.update(policy_loss=-at["j"], kl_old_exact=at["kl"], approx_kl=at["approx_kl"], entropy=at["entropy"])
    return out
