"""Update rules: SGD epochs over minibatches (rungs 1–6) and the trust-region step (rung 7, NPG).

Both take the flattened batch of valid steps (``[N, 1]`` tensors) and return detached diagnostics.
The policy loss of every rung comes from :func:`proxrl.objective.surrogate_loss`. One Adam holds the
actor and the critic (:func:`make_optimizer`): one optimizer step per minibatch whether the critic trains
in the same loss (rungs 4–6) or on its own (rungs 1–3 and 7, whose steps leave the other network's
gradients unset, so Adam does not touch it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import core
from ..batch import Batch
from ..objective import normalize_advantages, surrogate_loss
from ..run.guards import check_finite
from ..run.optim import make_adam
from ..run.sgd import minibatches, sgd_epochs
from ..rungs import Rung
from .policy import ActorCritic


def make_optimizer(policy: ActorCritic, lr: float, critic_lr: Optional[float] = None) -> torch.optim.Optimizer:
    """One Adam (eps 1e-5, DETAILS 3) over the actor and the critic, each one contiguous tensor
    (:meth:`ActorCritic.make_contiguous`): a single parameter group (``name`` 'actor+critic') when both learn
    at ``lr``, else two (``actor`` at ``lr``, ``critic`` at ``critic_lr``)."""
    leaves = policy.make_contiguous().leaves
    if len(leaves) == 1:
        return make_adam([{"params": leaves, "lr": lr, "name": "actor"}], lr, eps=1e-5)
    if critic_lr is None or critic_lr == lr:
        return make_adam([{"params": leaves, "lr": lr, "name": "actor+critic"}], lr, eps=1e-5)
    return make_adam([{"params": leaves[:1], "lr": lr, "name": "actor"},
                      {"params": leaves[1:], "lr": critic_lr, "name": "critic"}], lr, eps=1e-5)


def train_critic(policy: ActorCritic, optimizer: torch.optim.Optimizer, flat: Batch, epochs: int,
                 num_minibatches: int, max_grad_norm: float, clip_coef: Optional[float], update: int) -> float:
    """Regress V(s) on the returns for ``epochs`` shuffled passes (the separately trained critic of
    pg-rtg and TRPO, DETAILS 10). Returns the last epoch's mean value loss."""
    obs, ret, v_old = flat.obs[:, 0], flat.ret[:, 0], flat.values[:, 0]

    def step(idx: Tensor, where: str) -> dict:
        loss = core.value_loss(policy.value(obs[idx]), ret[idx], v_old[idx], clip_coef)
        check_finite("value_loss", loss, update, where)
        loss.backward()
        return {"value_loss": loss.detach()}

    res = sgd_epochs([optimizer], list(policy.critic.parameters()), epochs,
                     lambda: minibatches(len(ret), num_minibatches), max_grad_norm, update, step,
                     flat_grads=policy.flat_grads(actor=False, critic=True))
    return float(torch.stack([st["value_loss"] for st in res.stats[-num_minibatches:]]).mean())


def sgd_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, flat: Batch, rung: Rung, cfg, beta: float,
               update: int, old, dist=None) -> dict[str, float]:
    """``update_epochs`` × ``num_minibatches`` optimizer steps of the rung's surrogate. ``old`` is
    ``policy.snapshot(obs)`` taken before the update (π_old, for the exact KL of the penalty).

    Rungs 4–6 train the critic in the same steps (loss + vf_coef·value loss); rungs 1–3 take their policy
    step(s) first and then fit the critic separately for ``critic_epochs``.

    On several processes (``dist``; every rank holds the whole batch) each minibatch of the one global
    permutation is split over the ranks: advantages are normalised over the whole minibatch, each rank's
    loss and statistics are its rows' share of the minibatch mean, the gradients and statistics are summed.
    """
    split = dist is not None and dist.on
    obs, act, logp_old, adv = flat.obs[:, 0], flat.actions[:, 0], flat.logp_old[:, 0], flat.adv[:, 0]
    ret = flat.ret[:, 0]
    n = len(adv)
    joint_critic = policy.critic is not None and rung.surrogate != "vanilla"
    need_kl = rung.surrogate == "kl-penalty"
    old_out, old_log_std = old
    actor_params = policy.actor_parameters()
    params = actor_params + (list(policy.critic.parameters()) if joint_critic else [])
    first_dev: list[float] = []

    def step(idx: Tensor, where: str) -> dict:
        # every step of the flattened batch is real: the losses take no mask (core's mask=None)
        mb_adv = normalize_advantages(adv[idx], None, cfg.norm_adv)  # over the whole minibatch
        if split:  # this rank's rows of the minibatch, weighted by their share of it
            part = dist.shard(len(idx))
            idx, mb_adv, share = idx[part], mb_adv[part], (part.stop - part.start) / len(idx)
            if len(idx) == 0:
                keys = ["policy_loss"] + (["approx_kl"] if cfg.target_kl is not None else []) + \
                    (["clip_fraction"] if rung.surrogate == "clip" else []) + (["value_loss"] if joint_critic else [])
                return {k: torch.zeros(()) for k in keys}  # the keys every other rank returns (summed over ranks)
        mb_obs = obs[idx]  # gathered once for the actor and the critic
        dist_ = policy.dist(mb_obs)
        logp = dist_.log_prob(act[idx])
        kl = core.exact_kl(policy.distribution(old_out[idx], old_log_std), dist_) if need_kl else None
        loss, st = surrogate_loss(rung.surrogate, logp, logp_old[idx], mb_adv, None, clip_coef=cfg.clip_coef,
                                  beta=beta, kl=kl, ratio_stats=False,
                                  kl_stats=cfg.target_kl is not None)  # only target_kl reads it per minibatch
        if not first_dev:  # θ = θ_old here: the ratio must be exactly 1 (DETAILS 6)
            first_dev.append(float((torch.exp(logp.detach() - logp_old[idx]) - 1).abs().max()))
        surrogate = loss.detach()  # the logged policy_loss: the surrogate alone (METRICS), not the total
        if cfg.ent_coef > 0:
            loss = loss - cfg.ent_coef * dist_.entropy().mean()
        if joint_critic:
            v_loss = core.value_loss(policy.value(mb_obs), ret[idx], flat.values[idx, 0],
                                     cfg.clip_coef if cfg.clip_vloss else None)
            loss = loss + cfg.vf_coef * v_loss
            st["value_loss"] = v_loss.detach()
        check_finite("policy_loss", loss, update, where)
        st["policy_loss"] = surrogate
        if split:
            loss = loss * share
            st = {k: v * share if isinstance(v, Tensor) else v for k, v in st.items()}
        loss.backward()
        return st

    stop = (lambda st: float(st["approx_kl"]) > cfg.target_kl) if cfg.target_kl is not None else None
    res = sgd_epochs([optimizer], params, cfg.update_epochs, lambda: minibatches(n, cfg.num_minibatches),
                     cfg.max_grad_norm, update, step, stop_after_epoch=stop, dist=dist, reduce_stats=split,
                     flat_grads=policy.flat_grads(actor=True, critic=joint_critic))  # all in every loss
    policy_losses = [st["policy_loss"] for st in res.stats]
    clip_fracs = [st["clip_fraction"] for st in res.stats if "clip_fraction" in st]
    value_losses = [st["value_loss"] for st in res.stats if "value_loss" in st]
    first_dev, epoch, stopped_early = first_dev[0] if first_dev else 0.0, res.epochs_done - 1, res.stopped_early
    if split:  # the largest deviation over every rank's rows
        first_dev = float(dist.all_reduce_(torch.tensor([first_dev], dtype=torch.float64), "max"))
    out = {"policy_loss": float(torch.stack(policy_losses).mean()), "ratio_first_dev": first_dev,
           "epochs_done": epoch + 1, "early_stop": stopped_early}
    out["clip_fraction"] = float(torch.stack(clip_fracs).mean()) if clip_fracs else None
    if joint_critic:
        out["value_loss"] = float(torch.stack(value_losses[-cfg.num_minibatches:]).mean())
    elif policy.critic is not None:
        out["value_loss"] = train_critic(policy, optimizer, flat, cfg.critic_epochs, cfg.critic_minibatches,
                                         cfg.max_grad_norm, None, update)
    return out


def trust_region_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, flat: Batch, rung: Rung, cfg,
                        update: int, old) -> dict[str, float]:
    """TRPO (Schulman et al. 2015, arXiv:1502.05477, App. C): s = F⁻¹g by conjugate gradient on
    Fisher-vector products, scaled so ½sᵀFs = δ, then a backtracking line search accepting only a step
    with KL ≤ δ and a positive surrogate improvement. ``line_search=False`` takes the scaled step (NPG).
    The KL (bounded by δ = ``max_kl``, and whose Hessian F is) is ``cfg.trust_region_kl``'s: the joint KL of
    the action distribution, or its mean per action dimension (sb3-contrib's units, :func:`core.exact_kl`)."""
    obs, act, logp_old = flat.obs[:, 0], flat.actions[:, 0], flat.logp_old[:, 0]
    adv = normalize_advantages(flat.adv[:, 0], None, cfg.norm_adv)
    params = policy.actor_parameters()
    old_dist = policy.distribution(*old)  # π_old: ``old`` = policy.snapshot(obs) taken before the update

    def surrogate() -> Tensor:  # J(θ) = E[ratio·A], to maximise
        logp = policy.dist(obs).log_prob(act)
        return (torch.exp(logp - logp_old) * adv).mean()

    def mean_kl() -> Tensor:
        return core.exact_kl(old_dist, policy.dist(obs), cfg.trust_region_kl).mean()

    j0 = surrogate()
    g = core.flat_grad(j0, params)
    j0 = float(j0.detach())
    check_finite("policy gradient", g, update)
    fvp = core.fisher_vector_product_fn(mean_kl, params, cfg.cg_damping)
    stepdir = core.conjugate_gradient(fvp, g, cfg.cg_iters)
    shs = float(0.5 * (stepdir @ fvp(stepdir)))
    del fvp  # frees the kept graph of ∇KL before the line search
    theta_old = torch.nn.utils.parameters_to_vector(params).detach().clone()  # assigned back in place below
    out = {"policy_loss": -j0, "ls_accepted": False, "ls_backtracks": None, "ls_step_fraction": 0.0}
    if not math.isfinite(shs) or shs <= 0:
        out["ls_rejected_reason"] = "non-positive curvature"
    else:
        full_step = stepdir * math.sqrt(cfg.max_kl / shs)

        def evaluate(frac: float) -> tuple[float, float]:
            core.assign_flat(params, theta_old + frac * full_step)
            with torch.no_grad():
                return float(surrogate()) - j0, float(mean_kl())

        if rung.line_search:
            res = core.backtracking_line_search(evaluate, cfg.max_kl, cfg.backtrack_coef, cfg.backtrack_iters)
            out.update(ls_accepted=res.accepted, ls_backtracks=res.backtracks, ls_step_fraction=res.step_fraction)
            if not res.accepted:  # logged, never silent (DETAILS LM-16)
                core.assign_flat(params, theta_old)
        else:
            improvement, kl = evaluate(1.0)
            out.update(ls_accepted=True, ls_backtracks=0, ls_step_fraction=1.0)
        with torch.no_grad():
            out["policy_loss"] = -float(surrogate())
    out["value_loss"] = train_critic(policy, optimizer, flat, cfg.critic_epochs, cfg.critic_minibatches,
                                     cfg.max_grad_norm, None, update)
    return out


@torch.no_grad()
def post_update_diagnostics(policy: ActorCritic, flat: Batch, old=None) -> dict[str, float]:
    """One forward of the updated policy on the whole batch: how far it moved from π_old.

    ``approx_kl`` is k3 of KL(π_old‖π) on the sampled actions; ``kl_old_exact`` the exact mean KL;
    ``is_weight_var`` and ``ess`` describe the importance weights π/π_old the next reuse would see.
    """
    obs, act, logp_old = flat.obs[:, 0], flat.actions[:, 0], flat.logp_old[:, 0]
    dist = policy.dist(obs)
    logp = dist.log_prob(act)
    log_w = (logp - logp_old).clamp(-20, 20)
    w = torch.exp(log_w)
    out = {
        "approx_kl": float(core.kl_k3(logp_old, logp).mean()),
        "ratio_mean": float(w.mean()),
        "ratio_max": float(w.max()),
        "is_weight_var": float(w.var()) if len(w) > 1 else 0.0,
        "ess": float(core.effective_sample_size(log_w)),
        "entropy": float(dist.entropy().mean()),
    }
    if old is not None:  # exact KL(π_old‖π) from policy.snapshot() taken before the update
        out["kl_old_exact"] = float(core.exact_kl(policy.distribution(*old), dist).mean())
    return out
