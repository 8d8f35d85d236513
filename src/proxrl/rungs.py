"""The seven rungs of the ladder (plus ``npg``) as presets over independent choices.

A rung is a row: advantage estimator (the weight Φ_t on ∇log π) × surrogate × update rule × critic,
plus the config defaults that make it behave as the rung is meant to. Adding a rung is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rung:
    name: str
    weight: str        # "return" | "return-baseline" | "gae"        (objective.estimate_advantages)
    surrogate: str     # "vanilla" | "is" | "kl-penalty" | "clip"     (objective.surrogate_loss)
    update: str        # "sgd" (epochs × minibatches) | "trust-region" (CG + line search)
    critic: bool       # learn V(s)?
    line_search: bool = True  # trust-region only: False = natural policy gradient (full step scaled to δ)
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


RUNGS: dict[str, Rung] = {r.name: r for r in [
    Rung("pg", "return", "vanilla", "sgd", critic=False,
         defaults=dict(update_epochs=1, num_minibatches=1, norm_adv="scale", obs_norm=True, gamma=1.0),
         summary="rung 1: every step weighted by R(τ); one gradient step per batch"),
    Rung("pg-baseline", "return-baseline", "vanilla", "sgd", critic=False,
         defaults=dict(update_epochs=1, num_minibatches=1, norm_adv="scale", obs_norm=True, gamma=1.0),
         summary="rung 2: R(τ) − b, b = mean return of the batch"),
    Rung("pg-rtg", "gae", "vanilla", "sgd", critic=True,
         defaults=dict(update_epochs=1, num_minibatches=1, norm_adv="whiten", gae_lambda=1.0, critic_epochs=5),
         summary="rung 3: discounted reward-to-go − V(s) (GAE with λ=1 by default)"),
    Rung("is-pg", "gae", "is", "sgd", critic=True,
         defaults=dict(update_epochs=10, num_minibatches=4, norm_adv="whiten"),
         summary="rung 4: importance-sampled surrogate reused for several epochs, unconstrained"),
    Rung("ppo-kl", "gae", "kl-penalty", "sgd", critic=True,
         defaults=dict(update_epochs=10, num_minibatches=4, norm_adv="whiten"),
         summary="rung 5: PPO with an adaptive KL penalty (β×2 / β÷2 once per iteration)"),
    Rung("ppo-clip", "gae", "clip", "sgd", critic=True,
         defaults=dict(update_epochs=10, num_minibatches=4, norm_adv="whiten"),
         summary="rung 6: PPO with the clipped ratio"),
    Rung("trpo", "gae", "is", "trust-region", critic=True,
         defaults=dict(norm_adv="whiten", critic_epochs=5),
         summary="rung 7: natural gradient by CG on Fisher-vector products + KL-checked line search"),
    Rung("npg", "gae", "is", "trust-region", critic=True, line_search=False,
         defaults=dict(norm_adv="whiten", critic_epochs=5),
         summary="natural policy gradient: TRPO without the line search"),
]}

LADDER = ["pg", "pg-baseline", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo"]
