"""Tuned hyperparameters per (environment, rung), applied automatically as in the RL zoo.

Each preset names where its numbers come from. "zoo" = rl-baselines3-zoo ``hyperparams/*.yml``
(SB3's tuned values, translated: ``n_steps``→num_steps, ``n_envs``→num_envs, ``batch_size``→
num_minibatches = num_envs·num_steps / batch_size, ``n_epochs``→update_epochs, ``normalize``→obs_norm
+ reward_norm). "here" = adjusted in this repository, measured as in BENCHMARKS.md.
"""

from __future__ import annotations

import sys

from typing import Any, Optional

from ..errors import ConfigError

_CARTPOLE_PPO = dict(num_envs=8, num_steps=32, num_minibatches=1, gae_lambda=0.8, gamma=0.98,
                     update_epochs=20, ent_coef=0.0, lr=1e-3)

PRESETS: dict[str, dict[str, Any]] = {
    # here: tuned for wall-clock time to solve (BENCHMARKS.md, target 1), from the zoo's γ 0.98: 8 envs × 64 steps,
    # 8 epochs × 4 minibatches of 128, LR 2e-3 annealed, λ 0.95. Against the zoo's 20 epochs × 1 minibatch of 256
    # at LR 1e-3: 5 seeds solved in a median 14k env steps (zoo settings: 20k) at ~1/4 of the CPU time with 4
    # epochs and λ 0.8; LR 2.5e-3 solved faster but one seed of five ended at 196 at 50k steps. Ninth session, 36
    # variants × seeds 1-10, the best re-checked on seeds 11-20 (eval ≥ 475 every 2048 steps): λ 0.8 → 0.95 and
    # 4 → 8 epochs took the 20-seed median from 15,360 to 8,192 env steps (worst seed 30,720 → 18,432) and the
    # median time to solve from 0.98 to 0.81 s; every one of the 20 seeds solved with both
    "CartPole-v1/ppo-clip": dict(_CARTPOLE_PPO, num_steps=64, num_minibatches=4, update_epochs=8, lr=2e-3,
                                 gae_lambda=0.95),
    # zoo ppo.yml CartPole-v1 (lin_1e-3 LR; batch 256 = one minibatch, 20 epochs), with the penalty instead of
    # the clip; KL target set here
    "CartPole-v1/ppo-kl": dict(_CARTPOLE_PPO, kl_target=0.01, beta_init=1.0),
    # the zoo's PPO batch reused for 20 epochs without any constraint: what rung 4 is there to show
    "CartPole-v1/is-pg": dict(_CARTPOLE_PPO),
    # zoo (sb3-contrib) trpo.yml CartPole-v1: 2 envs × 512, 20 critic updates, λ 0.98
    "CartPole-v1/trpo": dict(num_envs=2, num_steps=512, gae_lambda=0.98, gamma=0.99, lr=1e-3, critic_epochs=20,
                             critic_minibatches=8, max_kl=0.01, cg_damping=0.1),
    "CartPole-v1/npg": dict(num_envs=2, num_steps=512, gae_lambda=0.98, gamma=0.99, lr=1e-3, critic_epochs=20,
                            critic_minibatches=8, max_kl=0.01, cg_damping=0.1),
    # here: REINFORCE-style rungs want large batches (whole episodes) and a higher LR
    "CartPole-v1/pg": dict(num_envs=8, num_steps=500, lr=1e-2),
    "CartPole-v1/pg-baseline": dict(num_envs=8, num_steps=500, lr=1e-2),
    "CartPole-v1/pg-rtg": dict(num_envs=8, num_steps=500, lr=1e-2, critic_lr=1e-2, gamma=0.99),
    # zoo ppo.yml Acrobot-v1
    "Acrobot-v1/ppo-clip": dict(num_envs=16, num_steps=256, gae_lambda=0.94, gamma=0.99, update_epochs=4,
                                ent_coef=0.0, obs_norm=True, reward_norm=True, num_minibatches=64),
    # zoo ppo.yml LunarLander-v2 (same task as v3)
    "LunarLander-v3/ppo-clip": dict(num_envs=16, num_steps=1024, num_minibatches=256, gae_lambda=0.98, gamma=0.999,
                                    update_epochs=4, ent_coef=0.01),
    # zoo ppo.yml Pendulum-v1 (4 envs × 1024, batch 64 → 64 minibatches, γ 0.9, λ 0.95, 10 epochs, LR 1e-3,
    # clip 0.2, normalize: true) minus its gSDE, which proxrl does not have (plain Gaussian, log-std 0).
    # here: obs_norm + reward_norm turned back on (the zoo's normalize; they had been off), and γ 0.9 → 0.98:
    # with the zoo's γ 0.9 and no gSDE, seed 1 learned to −1250 → −550 by 60k steps and then sat at −550
    # (training return) until 160k (our reading: no energy pumping from the bottom, which a 10-step horizon
    # barely rewards); with γ 0.98 (≈50-step horizon) seeds 1–5 all evaluate at −143..−173 after 200k
    # (threshold −300). Measured in benchmarks/results/learning.md.
    # action_rescale off: the 5/5 result was measured acting in the env's units (±2, clipped), as the zoo does.
    "Pendulum-v1/ppo-clip": dict(num_envs=4, num_steps=1024, num_minibatches=64, gae_lambda=0.95, gamma=0.98,
                                 update_epochs=10, lr=1e-3, clip_coef=0.2, ent_coef=0.0, obs_norm=True,
                                 reward_norm=True, action_rescale=False),
    # zoo ppo.yml HalfCheetah-v4 (normalize, 1 env × 512, batch 64, 20 epochs, ReLU 256-256, log-std −2)
    "HalfCheetah-v5/ppo-clip": dict(num_envs=1, num_steps=512, num_minibatches=8, gamma=0.98, lr=2.0633e-05,
                                    ent_coef=0.000401762, clip_coef=0.1, update_epochs=20, gae_lambda=0.92,
                                    max_grad_norm=0.8, vf_coef=0.58096, log_std_init=-2.0, activation="relu",
                                    hidden=(256, 256), obs_norm=True, reward_norm=True),
    # zoo (sb3-contrib) trpo.yml HalfCheetah: normalize, 2 envs × 1024, γ 0.99, λ 0.95, 20 critic updates of
    # minibatch 128, 25 CG steps, damping 0.1, target KL 0.04, critic LR 1e-3 constant (not annealed), line
    # search of 10 tries (the full step + 9 backtracks). sb3-contrib's target_kl and cg_damping are in units of
    # the KL *per action dimension* (its diagonal Gaussian's KL is averaged over the 6 dims with the batch):
    # trust_region_kl='per-dim' takes them as they are (issue 15: with the joint KL the same numbers gave a 6x
    # smaller trust region, a step of KL 0.027 where sb3-contrib's was 0.137 on the same batch, and a median
    # return of 1708 vs 3731 at 1M; benchmarks/trpo_compare.py)
    "HalfCheetah-v5/trpo": dict(num_envs=2, num_steps=1024, critic_minibatches=16, gamma=0.99, gae_lambda=0.95,
                                lr=1e-3, anneal_lr=False, critic_epochs=20, max_kl=0.04, cg_iters=25,
                                cg_damping=0.1, trust_region_kl="per-dim", backtrack_iters=9,
                                obs_norm=True, reward_norm=True),
}


def find_preset(preset: str, env: str, algo: str) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """'auto' → the preset of (env, algo) if any; 'none' → no preset; a name → that preset or an error."""
    if preset == "none":
        return None, None
    if preset == "auto":
        name = f"{env}/{algo}"
        return (name, dict(PRESETS[name])) if name in PRESETS else (None, None)
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}",
                          "use auto, none, or one of: " + ", ".join(sorted(PRESETS)))
    p_env, p_algo = preset.rsplit("/", 1)
    if (p_env, p_algo) != (env, algo):  # allowed (a starting point), never silently
        print(f"warning: preset: {preset} was tuned for {p_env} with {p_algo}; applying it to {env} with {algo}",
              file=sys.stderr)
    return preset, dict(PRESETS[preset])
