"""The gym training loop, top to bottom: collect → estimate advantages → update → log → checkpoint."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import numpy as np
import torch

from ..run import checkpoint
from .config import TrainConfig, env_kwargs_dict, ignored_by_rung, resolve, saved_fields, validate
from .envs import DiscreteActions, make_vec_env
from ..core import explained_variance, ppo_beta_update
from ..errors import CheckpointError, ConfigError, NumericsError
from ..objective import estimate_advantages
from .policy import ActorCritic
from .rollout import Runner
from ..rungs import RUNGS
from ..run.guards import Backup, check_parameters
from ..run.progress import Progress, tensorboard, tensorboard_available
from ..run.rundir import NullWriter, RunWriter, check_out, latest_checkpoint, prepare_out
from ..run.signals import RunInterrupted, StopSignals
from ..run.state import (CHECKPOINT_VERSION, load_optimizer_state, load_optimizer_states_flattened, optimizer_state,
                         rng_state, seed_everything, set_rng_state)
from .update import make_optimizer, post_update_diagnostics, sgd_update, trust_region_update

#: Every metrics.jsonl line has these keys (null where a rung has no such quantity).
METRICS = {
    "update": "update index, from 1",
    "step": "environment steps so far (all envs)",
    "episode_return": "mean undiscounted return of episodes finished during this rollout (null if none)",
    "episode_length": "mean length of those episodes",
    "policy_loss": "mean surrogate loss over the update's minibatches (negative objective)",
    "value_loss": "critic loss ½(V − R)² of the last critic epoch",
    "entropy": "mean policy entropy on the batch after the update",
    "approx_kl": "k3 estimate of KL(π_old‖π) on the batch after the update",
    "kl_old_exact": "exact mean KL(π_old‖π) on the batch after the update",
    "clip_fraction": "fraction of samples whose ratio left [1−ε, 1+ε] (ppo-clip)",
    "beta": "KL penalty coefficient β used in this update (ppo-kl)",
    "ratio_mean": "mean importance weight π/π_old after the update",
    "ratio_max": "max importance weight after the update",
    "is_weight_var": "variance of the importance weights after the update",
    "ess": "effective sample size of those weights, as a fraction of the batch",
    "explained_variance": "1 − Var[R − V]/Var[R] of the critic before the update",
    "ratio_first_dev": "max |ratio − 1| on the first minibatch (0 by construction)",
    "ls_accepted": "trpo: line search accepted a step",
    "ls_backtracks": "trpo: backtracks taken",
    "lr": "learning rate in this update",
    "sps": "environment steps per second (whole loop)",
    "time": "seconds since the start of the run",
    "comm_time": "seconds this update's rollout and update spent in collectives (several processes; 0 on one)",
}


@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    metrics: list[dict[str, Any]]

    @property
    def final_return(self) -> Optional[float]:
        vals = [m["episode_return"] for m in self.metrics if m["episode_return"] is not None]
        return vals[-1] if vals else None


def _default_out(cfg: TrainConfig) -> str:
    env = cfg.env.replace("/", "_")
    return os.path.join("runs", f"{env}-{cfg.algo}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


def _nan_to_none(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def build_policy(envs, cfg: TrainConfig) -> ActorCritic:
    rung = RUNGS[cfg.algo]
    return ActorCritic.for_spaces(envs.single_observation_space, envs.single_action_space, hidden=cfg.hidden,
                                  activation=cfg.activation, log_std_init=cfg.log_std_init, critic=rung.critic)


#: Fields ``--resume`` lets differ from the saved run: the budget (``steps``, raised only), what only changes
#: the console, and how often / how many checkpoints are written. Every other field given explicitly must
#: equal the saved one.
RESUME_MAY_CHANGE = ("steps", "progress", "resume", "out", "checkpoint_every", "keep_checkpoints")


def _resolve_resume(cfg: TrainConfig, explicit: Optional[Collection[str]] = None) -> tuple[TrainConfig, dict, dict]:
    from .config import apply, validate

    run_dir = Path(cfg.resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("resume", f"{run_dir} is a file, not a run directory", "give the directory `proxrl train --out` wrote")
    if cfg.overwrite:
        raise ConfigError("overwrite", "cannot be combined with --resume", "drop one of the two")
    tensors, state = latest_checkpoint(run_dir)
    if state.get("format") != "proxrl.gym/1" or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{run_dir}: not a proxrl gym run checkpoint")
    saved = saved_fields(state["config"])
    saved_cfg = apply(TrainConfig(), dict(saved), "checkpoint")
    if explicit is None:  # a TrainConfig was passed: every field set away from its default counts as given
        default = TrainConfig()
        explicit = [f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(default, f.name)]
    given, had = cfg.to_dict(), saved_cfg.to_dict()
    for name in sorted(set(explicit)):
        if name == "out":
            if cfg.out is not None and Path(cfg.out).resolve() != run_dir.resolve():
                raise ConfigError("out", f"--resume continues the run in {run_dir}; --out {cfg.out} names another "
                                  "directory", "drop --out (the run stays where it is)")
            continue
        if name in RESUME_MAY_CHANGE or name not in given:
            continue
        if given[name] != had[name]:
            raise ConfigError(name, f"--resume continues the run with its saved config ({name} = {had[name]!r}); "
                              f"it cannot change to {given[name]!r}",
                              "only --steps (to extend the run) may change; start a new run with another --out "
                              "to change it")
    steps = saved_cfg.steps
    if "steps" in explicit and cfg.steps != saved_cfg.steps:
        done = int(state["update"])
        if cfg.steps // saved_cfg.batch_size < done:
            raise ConfigError("steps", f"the run has already done {done} updates ({int(state['step'])} steps); "
                              f"--steps {cfg.steps} would end it before that",
                              f"give at least {done * saved_cfg.batch_size} steps")
        steps = cfg.steps
    saved.update(resume=None, out=str(run_dir), progress=cfg.progress, steps=steps, overwrite=False)
    saved.update({k: getattr(cfg, k) for k in ("checkpoint_every", "keep_checkpoints") if k in explicit})
    resumed = apply(TrainConfig(), saved, "checkpoint")
    validate(resumed)
    return resumed, tensors, state


def _default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<env>-<algo>-s<seed>-<time>``, with ``-2``, ``-3``… when a run started in the same second."""
    base = Path(_default_out(cfg))
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def train(config: Optional[TrainConfig] = None, *, env_factory: Optional[Callable] = None,
          callback: Optional[Callable[[dict, "Agent"], Optional[bool]]] = None,
          explicit: Optional[Collection[str]] = None, **fields: Any) -> RunResult:
    """Train one rung on one environment; the same fields as ``proxrl train``.

    ``proxrl.train(env="CartPole-v1", algo="ppo-clip", steps=50_000, seed=1)``. Pass ``env_factory`` (a
    callable returning a ``gymnasium.Env``) for custom environments; ``env`` then only names it.
    ``resume=DIR`` continues a run from its latest checkpoint: the result is bit-identical to a run that
    was never interrupted; ``steps`` may be raised to extend it, any other field given (``explicit``: the
    names given, by default the keyword fields, or with a config the fields set away from their defaults)
    that differs from the saved run is a ConfigError. An ``out`` that already holds a run is refused unless
    ``overwrite=True``. ``callback(line, agent)`` is called after every update with its metrics line
    and the current policy as an :class:`Agent`; returning True ends the run there (a checkpoint is written),
    e.g. to stop once an evaluation reaches a threshold. Returns the run directory, the resolved config and
    the metrics lines.
    """
    if config is None:
        if fields.get("resume"):  # types only here: the resumed config is the saved one, validated on resume
            from .config import apply

            config = apply(TrainConfig(), fields, "options")
        else:
            config, _ = resolve(fields)
        if explicit is None:
            explicit = set(fields)
    elif fields:
        raise TypeError("pass either a TrainConfig or keyword fields, not both")
    elif not config.resume:  # a TrainConfig built by hand is checked like the keyword fields and the CLI's
        default = TrainConfig()
        away = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if getattr(config, f.name) != getattr(default, f.name)}
        if explicit is None:
            explicit = set(away)
        if config.preset == "auto":  # its fields away from the defaults over rung → preset, as keywords are
            config, _ = resolve(away)
        else:
            validate(config)
    cfg, resumed = config, None
    if cfg.resume:
        cfg, ckpt_tensors, ckpt_state = _resolve_resume(cfg, explicit)
        resumed = (ckpt_tensors, ckpt_state)
    env_kwargs = env_kwargs_dict(cfg.env_kwargs)
    if env_kwargs and env_factory is not None:
        raise ConfigError("env_kwargs", "applies to Gymnasium ids, not to an env_factory",
                          "pass the arguments to your factory instead (e.g. functools.partial)")
    rung = RUNGS[cfg.algo]
    from ..run.device import resolve_device

    device = resolve_device(cfg.device)
    if torch.device(device).type == "meta":
        raise ConfigError("device", "meta holds no data: a gym run acts in its envs", "use --device cpu, cuda or auto")
    if cfg.tensorboard:  # checked before the run directory is touched
        tensorboard_available()
    d = _dist_context(cfg, device, resumed)  # several processes (torchrun): each rank steps its share of the envs
    saved_world = int(resumed[1].get("world_size", 1)) if resumed is not None else 1
    if resumed is not None:  # this rank's share of the checkpoint's envs, whatever number of processes wrote it
        resumed = _rank_state(resumed, d, cfg.num_envs)
    run_dir = Path(cfg.out) if cfg.out else _default_run_dir(cfg)
    if resumed is None:
        check_out(run_dir, overwrite=cfg.overwrite)  # refused before anything is made; written after the env
    torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    n_local = d.shard(cfg.num_envs).stop - d.shard(cfg.num_envs).start
    envs = make_vec_env(env_factory if env_factory is not None else cfg.env, n_local,
                        "sync" if (d.on or saved_world > 1) and cfg.vectorization == "auto" else cfg.vectorization,
                        env_kwargs)
    try:
        policy = build_policy(envs, cfg).to(device)
        critic_lr = cfg.critic_lr if cfg.critic_lr is not None else cfg.lr
        opt = make_optimizer(policy, cfg.lr, critic_lr)  # one Adam over actor and critic
        base_lr = {"actor": cfg.lr, "actor+critic": cfg.lr, "critic": critic_lr}
        runner = Runner(envs, policy, cfg.seed, cfg.gamma, cfg.obs_norm, cfg.reward_norm, cfg.clip_obs,
                        cfg.clip_reward, device, dist=d, num_envs_global=cfg.num_envs,
                        action_rescale=cfg.action_rescale)
        if resumed is None:  # only now that env, networks and runner exist: an old run is untouched by a failed start
            cfg_dict = cfg.to_dict()
            cfg_dict["out"] = str(run_dir)
            if d.main:
                prepare_out(run_dir, overwrite=cfg.overwrite)
                writer = RunWriter(run_dir, cfg_dict, fsync_each=False, samples=False)
            else:
                writer = NullWriter()
    except BaseException:
        envs.close()
        raise
    if resumed is None:
        d.barrier()
        for line in ignored_by_rung(cfg, explicit or ()) if d.main else ():  # accepted, but said: never silently
            print(f"warning: {line}", file=sys.stderr)
        if cfg.steps % cfg.batch_size and d.main and cfg.progress != "off":  # said once, never silently
            print(f"note: steps {cfg.steps} is not a multiple of the rollout batch {cfg.batch_size} (num_envs × "
                  f"num_steps): the run takes {cfg.num_updates} updates, {cfg.num_updates * cfg.batch_size} steps",
                  file=sys.stderr)
    beta = cfg.beta_init if rung.surrogate == "kl-penalty" else None
    first_update, time_offset = 1, 0.0
    metrics: list[dict[str, Any]] = []
    if resumed is not None:
        beta, first_update, time_offset = _restore(run_dir, resumed, policy, opt, runner)
        writer, metrics = (RunWriter.resume(run_dir, "update", first_update - 1, fsync_each=False) if d.main
                           else (NullWriter(), []))
    tb = tensorboard(run_dir, cfg.tensorboard and d.main)
    progress = Progress(cfg.num_updates, f"{cfg.algo} {cfg.env}", _progress_info, cfg.progress if d.main else "off",
                        done=first_update - 1)
    start = time.perf_counter() - time_offset
    update = first_update - 1
    try:
        with StopSignals() as stop:
            for update in range(first_update, cfg.num_updates + 1):
                frac = 1.0 - (update - 1) / cfg.num_updates if cfg.anneal_lr else 1.0
                for group in opt.param_groups:
                    group["lr"] = frac * base_lr[group["name"]]

                comm0 = d.comm_s
                batch, episodes = runner.collect(cfg.num_steps)
                batch = estimate_advantages(batch, rung.weight, cfg.gamma, cfg.gae_lambda)
                flat = batch.flatten_valid()  # [N, 1]: independent samples, autoreset steps dropped
                old = policy.snapshot(flat.obs[:, 0])  # π_old, taken once: penalty, trust region and diagnostics
                backup = Backup(policy, (opt,)) if cfg.on_nonfinite == "skip" else None
                line = {k: None for k in METRICS}
                try:
                    if len(flat.adv) == 0:  # every step of the rollout was an autoreset step: nothing to learn from
                        raise NumericsError(f"no valid step in the rollout of update {update} (each was an "
                                            "autoreset step): raise --num-steps or --num-envs")
                    if rung.update == "trust-region":
                        stats = trust_region_update(policy, opt, flat, rung, cfg, update, old)
                    else:
                        stats = sgd_update(policy, opt, flat, rung, cfg, beta or 0.0, update, old,
                                           d if cfg.dist_update == "split" else None)
                    diag = post_update_diagnostics(policy, flat, old)
                    check_parameters(policy.named_parameters(), update)
                except NumericsError as e:
                    if backup is None:
                        raise  # the last good checkpoint stays untouched
                    backup.restore()  # skipped, and logged: never silent
                    stats, diag = {"skipped": str(e)}, post_update_diagnostics(policy, flat, old) if len(flat.adv) else {}
                    print(f"warning: update {update} skipped: {e}", file=sys.stderr)
                line.update(stats)
                line.update(diag)
                if rung.surrogate == "kl-penalty":  # once per iteration, on the exact KL (DETAILS 9)
                    line["beta"] = beta
                    if "skipped" not in stats:
                        beta = ppo_beta_update(beta, diag["kl_old_exact"], cfg.kl_target)
                if rung.critic:
                    line["explained_variance"] = _nan_to_none(float(explained_variance(flat.values[:, 0], flat.ret[:, 0])))
                elapsed = time.perf_counter() - start
                line.update(update=update, step=runner.global_step,
                            episode_return=float(np.mean(episodes.returns)) if episodes.returns else None,
                            episode_length=float(np.mean(episodes.lengths)) if episodes.lengths else None,
                            lr=opt.param_groups[0]["lr"], sps=runner.global_step / elapsed, time=elapsed,
                            comm_time=d.comm_s - comm0)
                line = {k: _nan_to_none(v) for k, v in line.items()}
                writer.metrics(line)
                metrics.append(line)
                if tb is not None:
                    tb.log(line, runner.global_step)
                progress.update(line)
                done = callback is not None and bool(callback(line, _live_agent(policy, cfg, runner, envs)))
                done = d.any(done)  # a callback that ends the run on one rank ends it on all
                last = update == cfg.num_updates or done
                stopping = d.any(stop.signum is not None)
                if last or stopping or (cfg.checkpoint_every and update % cfg.checkpoint_every == 0):
                    writer.sync()
                    save_run(run_dir, runner, policy, cfg, update, opt, beta, elapsed)
                if stopping and not last:
                    import signal as _signal

                    raise RunInterrupted(stop.signum or _signal.SIGTERM, run_dir, update, "proxrl train")
                if done:
                    break
    finally:
        progress.close()
        writer.close()
        envs.close()
        if tb is not None:
            tb.close()
    return RunResult(run_dir, cfg, metrics)


def _live_agent(policy: ActorCritic, cfg: TrainConfig, runner: Runner, envs) -> "Agent":
    """The policy being trained, acting on raw observations with the current normaliser statistics."""
    rms = runner.obs_norm.rms if runner.obs_norm is not None else None
    return Agent(policy, cfg, rms, cfg.clip_obs, envs.single_action_space)


# ---------------------------------------------------------------------------- checkpoint state
def save_run(run_dir: Path, runner: Runner, policy: ActorCritic, cfg: TrainConfig, update: int,
             opt=None, beta=None, elapsed: float = 0.0) -> Path:
    """Everything that decides the future of the run: weights, the optimizer, normalisers, env state, β, RNGs.
    Layout version 3 (``CHECKPOINT_VERSION``): one optimizer ``optimizer`` over the actor and the critic, one
    contiguous tensor each; versions ≤ 2 held ``actor_opt`` and ``critic_opt`` with one state per layer and
    still load (:func:`_restore` concatenates them)."""
    from . import envstate

    tensors = {f"policy/{k}": v for k, v in policy.state_dict().items()}
    tensors.update(runner.state_tensors())
    opt_meta = {}
    if opt is not None:
        t, m = optimizer_state(opt, "optimizer")
        tensors.update(t)
        opt_meta["optimizer"] = m
    env_tensors, env_meta = envstate.get_state(runner.envs)
    d = runner.dist
    if d.on:  # each rank's envs and carried state, gathered by rank 0 under rank<r>/
        parts = d.gather_objects((runner.state_tensors(), env_tensors, env_meta))
        if not d.main:
            d.barrier()
            return run_dir / "checkpoints"
        tensors.update(parts[0][0])  # rank 0's normaliser statistics (the same on every rank) for load()
        for r, (rt, et, _) in enumerate(parts):
            tensors.update({f"rank{r}/{k}": v.clone() for k, v in {**rt, **et}.items()})
        env_meta = {"ranks": [m for _, _, m in parts], "unsupported": sorted({u for _, _, m in parts
                                                                             for u in m.get("unsupported", [])})}
    else:
        tensors.update(env_tensors)
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    state = {"format": "proxrl.gym/1", "version": CHECKPOINT_VERSION, "update": update, "step": runner.global_step, "config": cfg.to_dict(),
             "policy": {"kind": policy.kind, "obs_dim": runner.obs_dim, "act_dim": policy.act_dim,
                        "nvec": list(policy.nvec), "critic": policy.critic is not None},
             "optimizers": opt_meta, "beta": beta, "elapsed": elapsed, "runner": runner.state_json(),
             "env_state": env_meta, "rng": rng_meta, "world_size": d.world}
    space = runner.envs.single_action_space
    bounds = _bounds_json(space) if policy.kind == "continuous" else DiscreteActions.of(space).to_json()
    if bounds is not None:  # so that load(run).act clips to the env's bounds, or answers in its start and shape
        state["action_space"] = bounds  # (optional key)
    path = checkpoint.save(run_dir / "checkpoints", update, tensors, state, keep=cfg.keep_checkpoints)
    d.barrier()
    return path


def _dist_context(cfg: TrainConfig, device: str, resumed):
    """The distributed context of a gym run, with what several processes need checked first."""
    from ..run.dist import context

    d = context(device)
    if d.on:
        if cfg.vectorization == "numpy":
            raise ConfigError("vectorization", "numpy-vectorised envs share one random generator across their "
                              "sub-envs, so no split over processes reproduces them", "use sync or auto on several processes")
        if cfg.num_envs < d.world:
            raise ConfigError("num_envs", f"{cfg.num_envs} envs for {d.world} processes", f"use ≥ {d.world} envs")
    return d


def _rank_state(resumed, d, num_envs: int):
    """(tensors, state) of a checkpoint with this rank's envs and carried per-env state under their plain names
    and ``state["env_state"]`` this rank's: a run checkpointed on N processes resumes on M (M = N included).
    The envs are independent (each its own physics, counters and generator) and every stream is keyed by the
    global env index, so the checkpoint's envs, taken in order, are dealt to the M ranks as a run on M would
    hold them; weights, optimizer, normaliser statistics and the global RNGs are the same on every rank."""
    import re

    from . import envstate

    tensors, state = resumed
    saved, env_state = int(state.get("world_size", 1)), state["env_state"]
    if saved == 1 and not d.on:  # one process to one: the state as saved (any vector env)
        return resumed
    per_env = Runner.PER_ENV_STATE
    envs, carried = [], {k: [] for k in per_env}
    try:
        for r in range(saved):  # each saved rank's envs and rows, in global env order
            t = tensors if saved == 1 else {k[len(f"rank{r}/"):]: v for k, v in tensors.items()
                                            if k.startswith(f"rank{r}/")}
            envs += envstate.split_envs(t, env_state if saved == 1 else env_state["ranks"][r])
            for k in carried:
                if k in t:
                    carried[k] += list(t[k])
        if len(envs) != num_envs or any(v and len(v) != num_envs for v in carried.values()):
            raise ValueError(f"it holds {len(envs)} envs' state for num_envs {num_envs}")
    except (KeyError, ValueError, IndexError, TypeError) as e:
        why = str(e).splitlines()[0]
        raise CheckpointError(f"the env state of the checkpoint's {saved} process(es) is incomplete ({why})" if saved == d.world
                              else f"the run was checkpointed on {saved} process(es) and cannot resume on {d.world}: "
                                   f"{why}; resume it on {saved}") from None
    rows = d.shard(num_envs)
    out = {k: v for k, v in tensors.items()
           if not re.match(r"rank\d+/", k) and not k.startswith("env/") and k not in per_env}
    out.update({k: torch.stack(v[rows]) for k, v in carried.items() if v})
    env_tensors, env_meta = envstate.merge_envs(envs[rows])
    out.update(env_tensors)
    return out, {**state, "env_state": env_meta}


def _bounds_json(space) -> Optional[dict]:
    """A Box action space's shape and bounds, JSON-safe (an infinite bound is null)."""
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if low is None or high is None:
        return None
    enc = lambda a: [float(v) if np.isfinite(v) else None for v in np.asarray(a, np.float64).reshape(-1)]
    return {"shape": [int(d) for d in space.shape], "low": enc(low), "high": enc(high)}


class ActionBounds:
    """The bounds of a Box action space as :class:`Agent` uses them (``low``, ``high``, ``shape``)."""

    def __init__(self, low: np.ndarray, high: np.ndarray, shape: tuple[int, ...]):
        self.low, self.high, self.shape = low, high, tuple(shape)

    @classmethod
    def from_json(cls, d: Any, act_dim: int) -> Optional["ActionBounds"]:
        try:
            shape = tuple(int(x) for x in d["shape"])
            dec = lambda xs, inf: np.array([inf if v is None else float(v) for v in xs], np.float32)
            low, high = dec(d["low"], -np.inf), dec(d["high"], np.inf)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("checkpoint 'action_space' must hold shape, low and high lists") from None
        if low.size != act_dim or high.size != act_dim or int(np.prod(shape)) != act_dim or not (low <= high).all():
            raise CheckpointError(f"checkpoint 'action_space' does not match the policy's {act_dim} action dimensions")
        return cls(low, high, shape)


def _registry_bounds(cfg: TrainConfig) -> Optional[ActionBounds]:
    """Bounds of a checkpoint written before they were saved: from the registered env, if it is one."""
    try:
        import gymnasium as gym

        if cfg.env not in gym.registry:
            return None
        env = gym.make(cfg.env, **env_kwargs_dict(cfg.env_kwargs))
        try:
            space = env.action_space
        finally:
            env.close()
        return ActionBounds(space.low.astype(np.float32), space.high.astype(np.float32), space.shape)
    except Exception:  # an env that cannot be made here: act without clipping, as before
        return None


def _restore(run_dir: Path, resumed, policy, opt, runner: Runner):
    from . import envstate

    tensors, state = resumed  # this rank's share (_rank_state)
    env_state = state["env_state"]
    try:
        policy.load_state_dict({k[len("policy/"):]: v for k, v in tensors.items() if k.startswith("policy/")})
        saved = state["optimizers"]
        if "optimizer" in saved:
            load_optimizer_state(opt, "optimizer", tensors, saved["optimizer"])
        else:  # layout ≤ 2: one Adam per network, one state per layer: concatenated into the leaves
            load_optimizer_states_flattened(opt, [(name, saved[name]) for name in ("actor_opt", "critic_opt")
                                                  if name in saved], tensors, [len(m) for m in policy.store.members])
        runner.load_state(tensors, state["runner"])
        envstate.set_state(runner.envs, tensors, env_state)
        set_rng_state(tensors, state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
    if runner.dist.main and type(runner.envs).__name__ == "AsyncVectorEnv":  # envs in worker processes: unsaved
        print("warning: resume is not exact: --vectorization async keeps its envs in worker processes, whose "
              "state (physics, counters, generators) a checkpoint cannot hold; use sync for an exact resume",
              file=sys.stderr)
    elif runner.dist.main and env_state.get("unsupported"):  # said once (rank 0)
        print(f"warning: resume may not be exact: environment attributes not captured: "
              f"{', '.join(env_state['unsupported'][:5])}", file=sys.stderr)
    update = int(state["update"])
    return state.get("beta"), update + 1, float(state.get("elapsed", 0.0))


# ---------------------------------------------------------------------------- loading and evaluation
class Agent:
    """A trained policy that acts on raw environment observations (normalisation applied, frozen)."""

    def __init__(self, policy: ActorCritic, config: TrainConfig, obs_rms=None, clip_obs: float = 10.0, act_space=None):
        self.policy, self.config, self.obs_rms, self.clip_obs, self.act_space = policy, config, obs_rms, clip_obs, act_space
        self._normalize = None
        if obs_rms is not None:  # the training-time normaliser, frozen (never updated while acting)
            from .envs import ObsNormalizer

            self._normalize = ObsNormalizer(obs_rms.mean.shape, clip_obs)
            self._normalize.rms = obs_rms

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Actions for a batch of observations ``[n, *obs_shape]`` (or one observation)."""
        try:
            obs = np.asarray(obs, np.float32)
        except (TypeError, ValueError):
            raise ConfigError("obs", f"is not an array of numbers ({type(obs).__name__})",
                              "pass one observation or a batch [n, *obs_shape]") from None
        # one observation, or a batch [n, *obs_shape] — a batch of one ([1, d], evaluate with episodes=1) too
        single = obs.size == self.policy_obs_dim and (obs.ndim <= 1 or obs.shape[0] != 1)
        if not single and (obs.ndim == 0 or obs.shape[0] == 0 or obs.size != obs.shape[0] * self.policy_obs_dim):
            raise ConfigError("obs", f"shape {obs.shape} is neither one observation nor a batch of observations of "
                              f"{self.policy_obs_dim} values", "pass one observation or a batch [n, *obs_shape]")
        x = obs.reshape(1 if single else obs.shape[0], -1)
        if self._normalize is not None:
            x = self._normalize(x, update=False)
        dev = next(self.policy.parameters()).device  # the policy's device (a callback's live agent on CUDA)
        with torch.no_grad():
            a = self.policy.act(torch.as_tensor(x, dtype=torch.float32, device=dev), deterministic).cpu().numpy()
        if self.policy.kind == "continuous" and self.act_space is not None:
            from .envs import ActionMap

            a = ActionMap(self.act_space.low, self.act_space.high, self.config.action_rescale)(a.reshape(a.shape[0], -1))
            a = a.reshape(a.shape[0], *self.act_space.shape)
        elif self.act_space is not None:  # category indices → the space's start and shape
            if not isinstance(self.act_space, DiscreteActions):  # a gym space (evaluate, a live agent): read once
                self.act_space = DiscreteActions.of(self.act_space)
            a = self.act_space(a)
        return a[0] if single else a

    @property
    def policy_obs_dim(self) -> int:
        return self.policy.actor[0].in_features


def load(run_dir: str | os.PathLike) -> Agent:
    """Load the latest checkpoint of a run directory (safetensors + JSON, no pickle)."""
    from .config import apply
    from .envs import RunningMeanStd

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("run_dir", f"{run_dir} is not a directory", "pass the --out directory of `proxrl train`")
    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    tensors, state = checkpoint.load(root)
    try:
        saved = saved_fields(state["config"])
        pol = state["policy"]
        cfg = apply(TrainConfig(), {k: v for k, v in saved.items()}, "checkpoint")
        policy = ActorCritic(int(pol["obs_dim"]), str(pol["kind"]), int(pol["act_dim"]), nvec=pol["nvec"],
                             hidden=cfg.hidden, activation=cfg.activation, critic=bool(pol["critic"]))
        policy.load_state_dict({k[len("policy/"):]: v for k, v in tensors.items() if k.startswith("policy/")})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{root}: checkpoint does not match the proxrl gym format ({str(e).splitlines()[0]})") from None
    policy.eval()
    obs_rms = None
    if cfg.obs_norm:
        obs_rms = RunningMeanStd((int(pol["obs_dim"]),))
        obs_rms.load(tensors, "obs_rms")
    if policy.kind != "continuous":  # start and shape (an older checkpoint has none: indices from 0, flat)
        bounds = DiscreteActions.from_json(state["action_space"]) if "action_space" in state else None
    elif "action_space" in state:
        bounds = ActionBounds.from_json(state["action_space"], policy.act_dim)
    else:  # a checkpoint from before the bounds were saved
        bounds = _registry_bounds(cfg)
    agent = Agent(policy, cfg, obs_rms, cfg.clip_obs, bounds)
    return agent


#: the longest evaluation episode: an env whose episodes never end (no TimeLimit) is one error line, not a hang
EVAL_MAX_STEPS = 100_000


def evaluate(run_dir: str | os.PathLike, episodes: int = 20, seed: int = 12345, deterministic: bool = True,
             env_factory: Optional[Callable] = None, max_steps: int = EVAL_MAX_STEPS) -> dict[str, Any]:
    """Mean and std of the undiscounted return over ``episodes`` full episodes (one env each, in parallel).
    An episode still running after ``max_steps`` steps is a one-line ConfigError (wrap the env in a
    ``gymnasium.wrappers.TimeLimit``)."""
    if episodes <= 0:
        raise ConfigError("episodes", f"must be a positive integer, got {episodes}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ConfigError("seed", f"must be an integer in [0, 2**32), got {seed!r}")
    agent = load(run_dir)
    if env_factory is None:
        import gymnasium as gym

        if agent.config.env not in gym.registry:  # a name given with proxrl.train(env_factory=...), not an id
            raise ConfigError("env", f"the run's env {agent.config.env!r} is not a Gymnasium id (a run trained with "
                              "an env_factory?)", "evaluate it with proxrl.evaluate(run, env_factory=...)")
    kwargs = {} if env_factory is not None else env_kwargs_dict(agent.config.env_kwargs)
    envs = make_vec_env(env_factory or agent.config.env, episodes, "auto", kwargs)
    agent.act_space = envs.single_action_space
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    finished = np.zeros(episodes, bool)  # each env runs exactly one episode
    try:
        for _ in range(max_steps):
            obs, r, term, trunc, _ = envs.step(agent.act(obs, deterministic))
            live = ~finished
            returns += np.where(live, r, 0.0)
            finished |= live & (np.asarray(term) | np.asarray(trunc))
            if finished.all():
                break
        else:
            raise ConfigError("env", f"{int((~finished).sum())} of {episodes} evaluation episodes did not end "
                              f"within {max_steps} steps", "wrap the env in gymnasium.wrappers.TimeLimit "
                              "(or raise max_steps)")
    finally:
        envs.close()
    return {"mean_return": float(returns.mean()), "std_return": float(returns.std()), "episodes": episodes}


def _progress_info(line: dict) -> str:
    ret = line["episode_return"]
    info = f"return {ret:8.1f}" if ret is not None else "return     -   "
    return info + f"  sps {line['sps']:7.0f}  kl {line['approx_kl'] or 0:.4f}"
