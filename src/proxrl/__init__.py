"""proxrl: the policy-gradient ladder — vanilla PG to PPO and TRPO — on Gymnasium and on language models.

``import proxrl`` loads torch and numpy only; Gymnasium, transformers and plotting load where used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import core
from .batch import Batch
from .gym.config import TrainConfig
from .errors import CheckpointError, ConfigError, DataError, NumericsError, ProxrlError
from .rungs import LADDER, RUNGS


def train(*args, **kwargs):
    """Train a rung on an environment; see :func:`proxrl.trainer.train`."""
    from .gym.trainer import train as _train

    return _train(*args, **kwargs)


def load(run_dir):
    """Load a trained run as an :class:`~proxrl.trainer.Agent` that acts on raw observations."""
    from .gym.trainer import load as _load

    return _load(run_dir)


def evaluate(run_dir, episodes: int = 20, seed: int = 12345, deterministic: bool = True, env_factory=None,
             max_steps: int = 100_000):
    """Evaluate a saved run; returns ``{"mean_return", "std_return", "episodes"}``. An episode longer than
    ``max_steps`` steps (an env that never ends) is a one-line ConfigError."""
    from .gym.trainer import evaluate as _evaluate

    return _evaluate(run_dir, episodes, seed, deterministic, env_factory, max_steps)


__all__ = ["core", "Batch", "TrainConfig", "train", "load", "evaluate", "LADDER", "RUNGS",
           "ProxrlError", "ConfigError", "DataError", "CheckpointError", "NumericsError"]
