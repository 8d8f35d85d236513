"""One typed config for the gym ladder. Field docstrings are the CLI's ``--help`` (via tyro).

Resolution order (later wins): field defaults → the rung's defaults (:mod:`proxrl.rungs`) → the
environment's preset (:mod:`proxrl.presets`, applied automatically as in the RL zoo unless
``preset='none'``) → options given explicitly. ``config.json`` in the run directory records the result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
import typing
from typing import Any, Collection, Literal, Optional, Union

from ..errors import ConfigError, check, check_annotated
from ..rungs import RUNGS

Algo = Literal["pg", "pg-baseline", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo", "npg"]


@dataclass
class TrainConfig:
    env: str = "CartPole-v1"
    """Gymnasium environment id (or a name for a factory passed to proxrl.train)."""
    algo: Algo = "ppo-clip"
    """Rung of the ladder: pg, pg-baseline, pg-rtg, is-pg, ppo-kl, ppo-clip, trpo (npg = trpo without line search)."""
    preset: str = "auto"
    """'auto' applies the tuned preset of (env, algo) if there is one; 'none' turns presets off; or a preset name like 'CartPole-v1/ppo-clip'."""
    steps: int = 100_000
    """Total environment steps (summed over parallel envs), rounded down to whole rollout batches (num_envs × num_steps)."""
    seed: int = 1
    """Seed of torch, numpy, Python and the environments; the same seed gives the same run bit for bit on CPU."""
    num_envs: int = 8
    """Parallel environments."""
    num_steps: int = 128
    """Steps per environment per rollout; a rollout batch is num_envs × num_steps."""
    gamma: float = 0.99
    """Discount factor γ."""
    gae_lambda: float = 0.95
    """GAE λ (1 = discounted reward-to-go minus V; 0 = one-step TD)."""
    lr: float = 3e-4
    """Adam learning rate of the policy (and of the critic unless critic_lr is set)."""
    critic_lr: Optional[float] = None
    """Learning rate of the critic when it has its own optimizer (trust-region and vanilla rungs); default: lr."""
    anneal_lr: bool = True
    """Anneal learning rates linearly to 0 over the run."""
    update_epochs: int = 10
    """Passes over each rollout batch (SGD rungs)."""
    num_minibatches: int = 4
    """Minibatches per epoch; each is one optimizer step."""
    norm_adv: Literal["off", "scale", "whiten"] = "whiten"
    """Advantage normalisation per minibatch: off, scale (divide by std, keep mean), whiten (zero mean, unit std)."""
    clip_coef: float = 0.2
    """PPO clip range ε (ppo-clip)."""
    clip_vloss: bool = False
    """Clip the value loss around the old values with clip_coef (evidence says it rarely helps)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value-loss coefficient when actor and critic share an optimizer (SGD rungs)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip (0 disables)."""
    target_kl: Optional[float] = None
    """Stop the epochs of an update early when approx_kl (k3) exceeds this (off by default)."""
    kl_target: float = 0.01
    """ppo-kl: the KL(π_old‖π) the adaptive penalty aims for."""
    beta_init: float = 1.0
    """ppo-kl: initial penalty coefficient β."""
    max_kl: float = 0.01
    """trpo/npg: trust-region size δ on the mean KL(π_old‖π) (in the units of trust_region_kl)."""
    trust_region_kl: Literal["joint", "per-dim"] = "joint"
    """trpo/npg: the KL that max_kl bounds and whose Hessian CG inverts: joint = KL of the whole action distribution (summed over independent action dimensions, the TRPO paper's); per-dim = that divided by the number of action dimensions (sb3-contrib TRPO's convention for Box actions, so its target_kl and cg_damping are per dimension: a 6-dim action gets a 6x larger joint trust region and 6x the relative damping)."""
    cg_iters: int = 10
    """trpo/npg: conjugate-gradient iterations."""
    cg_damping: float = 0.1
    """trpo/npg: damping added to the Fisher-vector product."""
    backtrack_coef: float = 0.8
    """trpo: line-search shrink factor."""
    backtrack_iters: int = 10
    """trpo: maximum line-search backtracks."""
    critic_epochs: int = 5
    """Critic passes per batch for rungs that train it separately (pg-rtg, trpo, npg)."""
    critic_minibatches: int = 4
    """Minibatches per critic pass for rungs that train it separately."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the separate actor and critic MLPs."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden activation."""
    log_std_init: float = 0.0
    """Continuous actions: initial state-independent log standard deviation."""
    action_rescale: bool = True
    """Bounded Box actions: the policy acts in [-1, 1], mapped affinely onto the env's [low, high] (then clipped),
    so bounds far from 0 learn; false: the policy acts in the env's units, clipped to the bounds."""
    obs_norm: bool = False
    """Normalise observations by running mean/var (clipped to ±clip_obs); statistics saved with the model."""
    reward_norm: bool = False
    """Scale rewards by the running std of the discounted return (clipped to ±clip_reward); statistics saved."""
    clip_obs: float = 10.0
    """Clip of normalised observations."""
    clip_reward: float = 10.0
    """Clip of scaled rewards."""
    out: Optional[str] = None
    """Run directory (default: runs/<env>-<algo>-s<seed>-<time>)."""
    checkpoint_every: int = 10
    """Write a checkpoint every N updates (0: only at the end and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: Optional[str] = None
    """Continue the run in this directory from its latest checkpoint, exactly (its saved config is used; --steps may be raised and --checkpoint-every / --keep-checkpoints changed, any other option that differs is refused)."""
    overwrite: bool = False
    """Replace the run already in --out (its checkpoints, metrics and config are removed first); without it such an --out is refused."""
    env_kwargs: str = "{}"
    """Keyword arguments of gymnasium.make as a JSON object, e.g. '{"g": 9.81}' (recorded in config.json)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """NaN/inf in a loss or gradient: stop with an error naming it (default), or skip the update (logged)."""
    tensorboard: bool = False
    """Also log metrics to TensorBoard in <out>/tb."""
    progress: Literal["auto", "on", "off"] = "auto"
    """Progress bar: auto shows it on a terminal only."""
    torch_threads: int = 1
    """Torch CPU threads (1 is fastest for small MLPs)."""
    device: str = "cpu"
    """Torch device for the networks: cpu, cuda, cuda:N, mps, or auto (CUDA when available)."""
    vectorization: Literal["auto", "numpy", "sync", "async"] = "auto"
    """auto: Gymnasium's numpy-vectorised env when it has one (classic control), else SyncVectorEnv."""
    dist_update: Literal["replicate", "split"] = "replicate"
    """Several processes (torchrun): every rank computes the whole update on the gathered batch (replicate: no exchange; the gym's networks are small) or its share of each minibatch with the gradients summed (split: for large networks and minibatches)."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return max(1, self.steps // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


FIELD_NAMES = {f.name for f in fields(TrainConfig)}

#: Fields added after runs were first saved, with the value that reproduces such an older run.
OLDER_RUN_DEFAULTS = {"action_rescale": False, "trust_region_kl": "joint"}


def saved_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config, with the behaviour of its time for fields it predates."""
    return {**OLDER_RUN_DEFAULTS, **config}


def env_kwargs_dict(text: Any) -> dict[str, Any]:
    """The ``env_kwargs`` field parsed: a JSON object (blank = none), else a ConfigError naming the field."""
    import json

    fix = """a JSON object, e.g. --env-kwargs '{"g": 9.81}'"""
    if not isinstance(text, str):
        raise ConfigError("env_kwargs", f"must be a JSON object string, got {type(text).__name__}", fix)
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError("env_kwargs", f"not valid JSON ({str(e).splitlines()[0]})", fix) from None
    if not isinstance(value, dict):
        raise ConfigError("env_kwargs", f"must be a JSON object, got a {type(value).__name__}", fix)
    return value


def _env_kwargs_text(value: Any) -> Any:
    """A dict given through the Python API becomes the JSON text the field holds (and config.json records)."""
    import json

    if not isinstance(value, dict):
        return value
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError("env_kwargs", f"must be JSON-serialisable, it is recorded in config.json ({e})") from None


def apply(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    unknown = set(values) - FIELD_NAMES
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(name, f"unknown config field (from {source})", "see `proxrl train --help` for the fields")
    if isinstance(values.get("hidden"), list):
        values = {**values, "hidden": tuple(values["hidden"])}
    if "env_kwargs" in values:
        values = {**values, "env_kwargs": _env_kwargs_text(values["env_kwargs"])}
    for name, value in values.items():
        check_type(name, value)
    return dataclasses.replace(cfg, **values)


def ignored_by_rung(cfg: TrainConfig, given: Collection[str]) -> list[str]:
    """The options in ``given`` that the rung of ``cfg`` does not use, each as ``field: why`` — said on
    stderr rather than silently accepted (e.g. an entropy bonus on trpo, whose step has no loss to add it to)."""
    rung = RUNGS[cfg.algo]
    trust_region = rung.update == "trust-region"
    separate_critic = rung.critic and (trust_region or rung.surrogate == "vanilla")
    checks = {
        "ent_coef": (cfg.ent_coef > 0 and trust_region, "the trust-region step maximises the surrogate alone"),
        "clip_vloss": (cfg.clip_vloss and (separate_critic or not rung.critic),
                       "this rung fits its critic apart, by plain regression, or has none"),
        "target_kl": (cfg.target_kl is not None and (trust_region or cfg.update_epochs == 1),
                      "it stops the SGD epochs early, and this rung takes one pass" if not trust_region
                      else "the trust region, max_kl, bounds the KL itself"),
    }
    return [f"{name}: has no effect on {cfg.algo} ({why})" for name, (ignored, why) in checks.items()
            if ignored and name in given]


def resolve(explicit: dict[str, Any]) -> tuple[TrainConfig, Optional[str]]:
    """Build the config from explicitly given fields: defaults → rung → preset → explicit.
    Returns the config and the name of the preset applied (or None)."""
    from .presets import find_preset

    unknown = set(explicit) - FIELD_NAMES
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(name, "unknown config field", "see `proxrl train --help` for the fields")
    for name in ("algo", "env", "preset"):
        if name in explicit:
            check_type(name, explicit[name])
    algo = explicit.get("algo", TrainConfig.algo)
    if algo not in RUNGS:
        raise ConfigError("algo", f"unknown rung {algo!r}", f"choose one of {', '.join(RUNGS)}")
    cfg = apply(TrainConfig(), dict(RUNGS[algo].defaults), f"rung {algo}")
    env = explicit.get("env", cfg.env)
    preset_name, preset = find_preset(explicit.get("preset", "auto"), env, algo)
    if preset:
        cfg = apply(cfg, preset, f"preset {preset_name}")
    cfg = apply(cfg, explicit, "options")
    cfg = dataclasses.replace(cfg, preset=preset_name or "none")
    validate(cfg)
    return cfg, preset_name


def check_type(name: str, value: Any) -> None:
    """The value's type matches the field's annotation (bools are not numbers), else a ConfigError."""
    tp = _hints().get(name)
    if tp is not None:
        check_annotated(name, tp, value)


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    return _HINTS


def validate(cfg: TrainConfig) -> None:
    """Every field checked with a message naming it and the fix. Never ``assert`` (survives ``python -O``)."""
    for f in fields(cfg):
        check_type(f.name, getattr(cfg, f.name))
    env_kwargs_dict(cfg.env_kwargs)

    def finite(name: str) -> None:
        v = getattr(cfg, name)
        check(isinstance(v, (int, float)) and math.isfinite(v), name, f"must be a finite number, got {v!r}")

    for name in ("steps", "num_envs", "num_steps", "update_epochs", "num_minibatches", "cg_iters", "critic_epochs",
                 "critic_minibatches"):
        v = getattr(cfg, name)
        check(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
    for name in ("gamma", "gae_lambda", "lr", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "kl_target",
                 "beta_init", "max_kl", "cg_damping", "backtrack_coef", "log_std_init", "clip_obs", "clip_reward"):
        finite(name)
    check(0.0 <= cfg.gamma <= 1.0, "gamma", f"must be in [0, 1], got {cfg.gamma}")
    check(0.0 <= cfg.gae_lambda <= 1.0, "gae_lambda", f"must be in [0, 1], got {cfg.gae_lambda}")
    check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    check(cfg.critic_lr is None or (math.isfinite(cfg.critic_lr) and cfg.critic_lr > 0), "critic_lr",
          f"must be > 0, got {cfg.critic_lr}")
    check(cfg.clip_coef > 0, "clip_coef", f"must be > 0, got {cfg.clip_coef}", "typical: 0.1–0.3")
    check(cfg.ent_coef >= 0, "ent_coef", f"must be ≥ 0, got {cfg.ent_coef}")
    check(cfg.vf_coef >= 0, "vf_coef", f"must be ≥ 0, got {cfg.vf_coef}")
    check(cfg.max_grad_norm >= 0, "max_grad_norm", f"must be ≥ 0 (0 disables), got {cfg.max_grad_norm}")
    check(cfg.target_kl is None or (math.isfinite(cfg.target_kl) and cfg.target_kl > 0), "target_kl",
          f"must be > 0 or unset, got {cfg.target_kl}")
    check(cfg.kl_target > 0, "kl_target", f"must be > 0, got {cfg.kl_target}")
    check(cfg.beta_init >= 0, "beta_init", f"must be ≥ 0, got {cfg.beta_init}")
    check(cfg.max_kl > 0, "max_kl", f"must be > 0, got {cfg.max_kl}")
    check(cfg.cg_damping >= 0, "cg_damping", f"must be ≥ 0, got {cfg.cg_damping}")
    check(0 < cfg.backtrack_coef < 1, "backtrack_coef", f"must be in (0, 1), got {cfg.backtrack_coef}")
    check(isinstance(cfg.backtrack_iters, int) and cfg.backtrack_iters >= 0, "backtrack_iters",
          f"must be an integer ≥ 0, got {cfg.backtrack_iters}")
    check(cfg.clip_obs > 0 and cfg.clip_reward > 0, "clip_obs" if cfg.clip_obs <= 0 else "clip_reward", "must be > 0")
    check(len(cfg.hidden) > 0 and all(isinstance(h, int) and h > 0 for h in cfg.hidden), "hidden",
          f"must be positive layer sizes, got {cfg.hidden}")
    check(cfg.num_minibatches <= cfg.batch_size, "num_minibatches",
          f"{cfg.num_minibatches} minibatches cannot split a batch of {cfg.batch_size} (num_envs × num_steps)",
          "use fewer minibatches or a larger batch")
    check(cfg.steps >= cfg.batch_size, "steps",
          f"{cfg.steps} is less than one rollout batch ({cfg.batch_size} = num_envs × num_steps)",
          "raise --steps or shrink --num-envs/--num-steps")
    check(isinstance(cfg.torch_threads, int) and cfg.torch_threads > 0, "torch_threads", "must be a positive integer")
    check(isinstance(cfg.checkpoint_every, int) and cfg.checkpoint_every >= 0, "checkpoint_every", "must be ≥ 0")
    check(0 <= cfg.seed < 2 ** 32, "seed", f"must be in [0, 2**32), got {cfg.seed}")
    for name in ("num_envs", "num_steps", "torch_threads"):
        check(getattr(cfg, name) <= 1_000_000, name, f"is implausibly large ({getattr(cfg, name)})", "at most 1e6")
    check(all(h <= 1_000_000 for h in cfg.hidden), "hidden", f"layer sizes are implausibly large ({cfg.hidden})")
    rung = RUNGS[cfg.algo]
    if rung.update == "sgd":
        check(cfg.batch_size % cfg.num_minibatches == 0, "num_minibatches",
              f"{cfg.num_minibatches} does not divide the batch of {cfg.batch_size} (num_envs × num_steps)",
              f"choose a divisor of {cfg.batch_size}")
    if rung.critic and (rung.update == "trust-region" or rung.surrogate == "vanilla"):
        check(cfg.critic_minibatches <= cfg.batch_size and cfg.batch_size % cfg.critic_minibatches == 0,
              "critic_minibatches",
              f"{cfg.critic_minibatches} does not divide the batch of {cfg.batch_size} (num_envs × num_steps)",
              f"choose a divisor of {cfg.batch_size}")
    if "keep_checkpoints" in FIELD_NAMES:
        check(getattr(cfg, "keep_checkpoints") >= 1, "keep_checkpoints",
              f"must be ≥ 1 (the last good checkpoint is always kept), got {getattr(cfg, 'keep_checkpoints')}")
    from ..run.device import resolve_device

    resolve_device(cfg.device)
