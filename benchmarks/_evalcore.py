"""The evaluation both sides use, identical to ``proxrl eval DIR --episodes 20``: ``episodes`` envs of a
numpy-vectorised Gymnasium env (one episode each, reset with seed 12345), deterministic actions, mean
undiscounted return. Needs only numpy and gymnasium, so it runs in the peers' venv too."""

from __future__ import annotations

import numpy as np


def evaluate(act, env_id: str = "CartPole-v1", episodes: int = 20, seed: int = 12345) -> float:
    import gymnasium as gym

    spec = gym.registry[env_id]
    if spec.vector_entry_point is not None:
        envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="vector_entry_point")
    else:
        envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="sync")
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    finished = np.zeros(episodes, bool)
    try:
        while not finished.all():
            obs, r, term, trunc, _ = envs.step(act(obs))
            live = ~finished
            returns += np.where(live, r, 0.0)
            finished |= live & (np.asarray(term) | np.asarray(trunc))
    finally:
        envs.close()
    return float(returns.mean())


def warm_torch_optim() -> None:
    """Build one Adam before the clock starts: torch's first optimizer imports torch._dynamo (seconds, on
    both sides alike), which is start-up cost, not training."""
    import torch

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
