"""Vectorised Gymnasium environments and the running statistics that normalise them.

The normalisers live here, not in Gymnasium wrappers, so their statistics are plain tensors that go
into the checkpoint beside the weights (DETAILS 8: CleanRL #425/#532, SB3 #468 lost them).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ..errors import ConfigError, NumericsError

EnvSpec = Union[str, Callable[[], Any]]


class RunningMeanStd:
    """Running mean and variance (parallel algorithm of Chan et al.), float64."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon
        self.gather = None  # several processes: every rank's rows of x, so all ranks keep the same statistics

    def update(self, x: np.ndarray, keep: Optional[np.ndarray] = None) -> None:
        """Fold the rows of ``x`` (those where ``keep`` is True, when given) into the statistics. With
        ``gather`` (several processes) every row is passed: ``keep`` is for statistics kept on one rank."""
        if self.gather is not None:
            if keep is not None:
                raise ValueError("RunningMeanStd.update: keep is not combined with gather")
            x = self.gather(x)
        if keep is not None:
            x = x[keep]
        if x.shape[0] == 0:
            return
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - self.mean
        tot = self.count + b_count
        self.mean = self.mean + delta * b_count / tot
        m2 = self.var * self.count + b_var * b_count + delta ** 2 * self.count * b_count / tot
        self.var = m2 / tot
        self.count = tot

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}/mean": torch.from_numpy(np.asarray(self.mean, np.float64)).clone(),
                f"{prefix}/var": torch.from_numpy(np.asarray(self.var, np.float64)).clone(),
                f"{prefix}/count": torch.tensor([self.count], dtype=torch.float64)}

    def load(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        mean = tensors[f"{prefix}/mean"].numpy()
        if mean.shape != self.mean.shape:
            raise ConfigError(prefix, f"saved statistics have shape {mean.shape}, the environment needs {self.mean.shape}")
        self.mean, self.var = mean.copy(), tensors[f"{prefix}/var"].numpy().copy()
        self.count = float(tensors[f"{prefix}/count"][0])


class ObsNormalizer:
    """(obs − μ) / √(σ² + ε), clipped to ±clip (DETAILS 8). ``frozen`` for evaluation."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0):
        self.rms, self.clip = RunningMeanStd(shape), clip

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if update:
            self.rms.update(obs)
        return np.clip((obs - self.rms.mean) / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """r / √(Var[discounted return] + ε), clipped (the "reward scaling" of the 37 details, #1 of its
    MuJoCo section): the running statistics are of G_t = γ·G_{t−1} + r_t per env, reset at episode end."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0):
        self.rms, self.gamma, self.clip = RunningMeanStd(()), gamma, clip
        self.discounted = np.zeros(num_envs, np.float64)

    def __call__(self, reward: np.ndarray, valid: np.ndarray, ended: np.ndarray) -> np.ndarray:
        return self.update_and_scale(self.accumulate(reward, valid, ended), valid, reward)

    def accumulate(self, reward: np.ndarray, valid: np.ndarray, ended: np.ndarray) -> np.ndarray:
        """Advance G_t of every env; returns G_t, the rows the statistics take (where ``valid``)."""
        self.discounted = np.where(valid, self.discounted * self.gamma + reward, self.discounted)
        g = self.discounted.copy()
        self.discounted[ended] = 0.0
        return g

    def update_and_scale(self, g: np.ndarray, valid: np.ndarray, reward: np.ndarray) -> np.ndarray:
        """One step: G_t's ``valid`` rows into the statistics, then r / √(Var + ε), clipped. Several processes
        replay it per step at the rollout's end, with every rank's G_t (``proxrl.gym.rollout``)."""
        self.rms.update(g, keep=valid)
        return np.clip(reward / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)


class ActionMap:
    """What a bounded Box env receives for a policy's continuous action (DETAILS 7).

    ``rescale``: the policy acts in [-1, 1] on every dimension with finite bounds, mapped affinely onto
    [low, high] — a Gaussian that starts at 0 with std 1 then covers the whole range whatever the bounds
    (with bounds [5, 10] and no rescaling every early sample is clipped to 5 and the gradient is 0). Always
    clipped to the bounds last. The sample itself, unmapped and unclipped, is what is stored and trained on.
    """

    def __init__(self, low: np.ndarray, high: np.ndarray, rescale: bool):
        self.low = np.asarray(low, np.float64).reshape(-1)
        self.high = np.asarray(high, np.float64).reshape(-1)
        self.finite = np.isfinite(self.low) & np.isfinite(self.high)
        self.rescale = bool(rescale) and bool(self.finite.any())

    def __call__(self, action: np.ndarray) -> np.ndarray:
        """``action`` [n, d] (the policy's) → the env's action [n, d], float32."""
        a = np.asarray(action, np.float64)
        if self.rescale:
            lo, hi = np.where(self.finite, self.low, -1.0), np.where(self.finite, self.high, 1.0)
            a = np.where(self.finite, lo + (np.clip(a, -1.0, 1.0) + 1.0) * 0.5 * (hi - lo), a)
        return np.clip(a, self.low, self.high).astype(np.float32)


class DiscreteActions:
    """What a Discrete / MultiDiscrete env receives for the policy's category indices: the policy draws each
    sub-action in [0, n) (a MultiDiscrete's sub-actions flat); Gymnasium's spaces take ``start`` … ``start +
    n − 1`` (``Discrete(3, start=-1)``) and a MultiDiscrete its ``nvec``'s shape (a 2-D ``nvec``). Stored in the
    checkpoint (``to_json``) so that ``load(run).act`` answers in the env's own actions."""

    def __init__(self, start, shape):
        self.start = np.asarray(start, np.int64).reshape(-1)
        self.shape = tuple(int(d) for d in shape)
        self.identity = not self.start.any() and len(self.shape) <= 1  # start 0, flat: the indices themselves

    @classmethod
    def of(cls, space) -> "DiscreteActions":
        return cls(getattr(space, "start", 0), space.shape)

    def __call__(self, action: np.ndarray) -> np.ndarray:
        """``action`` [n] (Discrete) or [n, k] (MultiDiscrete, flat) → the env's actions [n, *shape]."""
        if self.identity:
            return action
        n = action.shape[0]
        return (action.reshape(n, -1) + self.start).reshape(n, *self.shape)

    def to_json(self) -> dict:
        return {"discrete_start": self.start.tolist(), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d) -> Optional["DiscreteActions"]:
        try:
            return cls([int(v) for v in d["discrete_start"]], [int(v) for v in d["shape"]])
        except (KeyError, TypeError, ValueError):
            return None


class _ContainsOnce:
    """A space's ``contains`` that runs the real check until one action passes, then answers True."""

    def __init__(self, contains):
        self.contains, self.passed = contains, False

    def __call__(self, x) -> bool:
        if self.passed:
            return True
        self.passed = bool(self.contains(x))
        return self.passed


def validate_actions_once(vec) -> None:
    """Let a vector env check the runner's actions against its action space once, not at every step.

    Gymnasium's numpy-vectorised envs assert ``action_space.contains(action)`` in every ``step`` (a quarter of
    CartPole's vector step). The runner's actions are valid by construction — categorical draws lie in
    the space's range (:class:`DiscreteActions`), Box actions are clipped to the bounds (:class:`ActionMap`) — with the same dtype and shape every
    step, so the first one is checked by the env's own code and later ones are not re-checked. Only the
    rollout's env is changed; evaluation and users' envs keep their checks."""
    space = getattr(vec, "action_space", None)
    if space is not None and not isinstance(getattr(space, "contains", None), _ContainsOnce):
        space.contains = _ContainsOnce(space.contains)


def make_vec_env(env: EnvSpec, num_envs: int, vectorization: str = "auto", env_kwargs: Optional[dict] = None):
    """A Gymnasium vector env with NEXT_STEP autoreset (Gymnasium ≥ 1.0's default).

    ``env`` is an id or a factory returning a ``gymnasium.Env`` (or a ``VectorEnv`` of ``num_envs``).
    ``auto`` uses the numpy-vectorised implementation when Gymnasium registers one (CartPole: one numpy
    call per step for all envs, an order of magnitude faster than SyncVectorEnv), else SyncVectorEnv.
    """
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, VectorEnv

    env_kwargs = env_kwargs or {}
    try:
        if callable(env):
            factory = env
            env = lambda: _call_user(factory, "env_factory", _callable_name(factory))  # noqa: E731
            made = env()
            if isinstance(made, VectorEnv):
                vec = made
            else:
                if not isinstance(made, gym.Env):
                    raise ConfigError("env_factory", f"returned a {type(made).__name__}, not a gymnasium.Env",
                                      "return a gymnasium.Env (or a VectorEnv of num_envs envs)")
                try:
                    _check_spaces(made)
                    _call_user(lambda: probe_env(made), "env", f"the env made by {_callable_name(factory)}")
                finally:
                    made.close()
                vec = gym.vector.SyncVectorEnv([env for _ in range(num_envs)], autoreset_mode=AutoresetMode.NEXT_STEP)
        else:
            if env not in gym.registry:
                import difflib

                close = difflib.get_close_matches(env, list(gym.registry), n=1)
                hint = f"did you mean {close[0]}?" if close else "see gymnasium.registry for the ids"
                raise ConfigError("env", f"unknown Gymnasium environment id {env!r}", hint)
            spec = gym.registry[env]
            mode = vectorization
            if mode == "auto":
                mode = "numpy" if spec.vector_entry_point is not None else "sync"
            if mode == "numpy":
                if spec.vector_entry_point is None:
                    raise ConfigError("vectorization", f"{env} has no numpy-vectorised implementation", "use sync or auto")
                vec = gym.make_vec(env, num_envs=num_envs, vectorization_mode="vector_entry_point", **env_kwargs)
            else:
                vec = gym.make_vec(env, num_envs=num_envs, vectorization_mode=mode,
                                   vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP}, **env_kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        if not env_kwargs or callable(env):
            raise
        raise ConfigError("env_kwargs", f"{env} does not accept {sorted(env_kwargs)} ({_first_line(e)})",
                          "see the environment's documentation for its arguments") from None
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError("env", f"{env!r} needs an extra dependency ({str(e).splitlines()[0]})",
                          "e.g. pip install 'gymnasium[mujoco]' or 'gymnasium[box2d]'") from None
    except gym.error.Error as e:
        raise ConfigError("env", f"cannot create {env!r}: {str(e).splitlines()[0]}") from None
    mode = vec.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.NEXT_STEP and str(mode) != "NextStep":
        raise ConfigError("env", f"vector env uses autoreset mode {mode}, proxrl expects NEXT_STEP",
                          "create it with autoreset_mode=AutoresetMode.NEXT_STEP")
    if vec.num_envs != num_envs:
        raise ConfigError("num_envs", f"the env factory returned a VectorEnv of {vec.num_envs} envs, not {num_envs}")
    _check_spaces(vec)
    return vec


def _call_user(fn, field: str, name: str):
    """Call user code; an exception it raises becomes one ConfigError line naming ``name`` (proxrl's own
    one-line errors pass through)."""
    try:
        return fn()
    except (ConfigError, NumericsError):
        raise
    except Exception as e:
        raise ConfigError(field, f"{name} raised {type(e).__name__}: {_first_line(e)}",
                          "fix it (call it by hand to see the traceback)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:200] or "(no message)"


def _callable_name(fn) -> str:
    return f"env_factory {getattr(fn, '__qualname__', type(fn).__name__)!r}"


def _check_obs(obs: Any, space, where: str) -> None:
    try:
        arr = np.asarray(obs, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("env", f"observation from {where} is a {type(obs).__name__}, not an array",
                          f"return an array of shape {space.shape}") from None
    if arr.shape != tuple(space.shape):
        raise ConfigError("env", f"observation from {where} has shape {arr.shape}, the observation space says "
                          f"{tuple(space.shape)}", "make the env and its observation_space agree")
    if not np.isfinite(arr).all():
        raise NumericsError(f"observation: NaN or inf from the environment's {where}")


def probe_env(env) -> None:
    """Reset and step a single env once, checking the observation's shape and finiteness and the reward's
    type and finiteness, so a defective custom env fails with one line before training starts."""
    import numbers

    obs, _ = env.reset(seed=0)
    _check_obs(obs, env.observation_space, "reset()")
    out = env.step(env.action_space.sample())
    if not isinstance(out, tuple) or len(out) != 5:
        raise ConfigError("env", f"step() returned {type(out).__name__} of length "
                          f"{len(out) if hasattr(out, '__len__') else '?'}, not 5 items",
                          "return (obs, reward, terminated, truncated, info) (Gymnasium ≥ 0.26 API)")
    obs, reward, terminated, truncated, _ = out
    _check_obs(obs, env.observation_space, "step()")
    if isinstance(reward, np.ndarray) and reward.size == 1:
        reward = reward.reshape(()).item()
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool):
        raise ConfigError("env", f"reward from step() is a {type(reward).__name__}, not a number",
                          "return a float reward")
    if not np.isfinite(float(reward)):
        raise NumericsError("reward: NaN or inf from the environment's step()")
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ConfigError("env", f"{name} from step() is a {type(flag).__name__}, not a bool")


def _check_spaces(vec) -> None:
    import gymnasium as gym

    # not ``or``: a space of no elements (MultiDiscrete([])) is falsy, and the batched space is another space
    obs = getattr(vec, "single_observation_space", None)
    obs = vec.observation_space if obs is None else obs
    act = getattr(vec, "single_action_space", None)
    act = vec.action_space if act is None else act
    if not isinstance(obs, gym.spaces.Box):
        raise ConfigError("env", f"observation space {obs} is not supported", "proxrl handles Box observations")
    if not isinstance(act, (gym.spaces.Discrete, gym.spaces.Box, gym.spaces.MultiDiscrete)):
        raise ConfigError("env", f"action space {act} is not supported", "use Discrete, MultiDiscrete or Box")
    for what, space in (("observation", obs), ("action", act)):
        if not isinstance(space, gym.spaces.Discrete) and int(np.prod(space.shape)) == 0:
            raise ConfigError("env", f"{what} space {space} has no elements (shape {space.shape})",
                              f"give the env an {what} of at least one number")
    if isinstance(act, gym.spaces.Box) and not np.issubdtype(act.dtype, np.floating):
        # the Gaussian policy's (rescaled, clipped) actions are real numbers: such an env got 2.73 for an int
        raise ConfigError("env", f"action space {act} has {act.dtype} actions, the Gaussian policy's are real "
                          "numbers", "use a float Box, or MultiDiscrete for integer actions")
