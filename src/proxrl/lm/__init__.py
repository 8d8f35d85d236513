"""RLHF for language models on the shared core: SFT → reward model → PPO.

Heavy dependencies (transformers, peft, vaderSentiment, gensim, matplotlib) load on first use, so
``import proxrl.lm`` costs nothing. The functions mirror the CLI commands ``proxrl rlhf sft|rm|ppo|train|demo``;
:class:`PPOTrainer` is the step-wise form (generate → score → step) for your own loop.
"""

from __future__ import annotations

from .config import LM_LADDER, LM_RUNGS, DemoConfig, ModelOptions, PPOConfig, RLConfig, RMConfig, SFTConfig


def sft(config: SFTConfig, **kwargs) -> dict:
    """Supervised fine-tuning; see :func:`proxrl.lm.sft_trainer.sft`."""
    from .sft_trainer import sft as _sft

    return _sft(config, **kwargs)


def reward_model(config: RMConfig, **kwargs) -> dict:
    """Train a Bradley–Terry reward model; see :func:`proxrl.lm.rm.reward_model`."""
    from .rm import reward_model as _rm

    return _rm(config, **kwargs)


def ppo(config: PPOConfig, reward=None, **kwargs) -> dict:
    """PPO against a reward-model directory or a Python function ``(prompts, responses) -> floats``."""
    from .ppo_trainer import ppo as _ppo

    return _ppo(config, reward=reward, **kwargs)


def train(config: RLConfig, reward=None, **kwargs) -> dict:
    """Any rung of the ladder on tokens (``config.algo``: pg, pg-baseline, rloo, grpo, pg-rtg, is-pg,
    ppo-kl, ppo-clip, trpo) against a reward-model directory or a Python function; see
    :func:`proxrl.lm.ppo_trainer.train`."""
    from .ppo_trainer import train as _train

    return _train(config, reward=reward, **kwargs)


def demo(config: DemoConfig | None = None, **kwargs) -> dict:
    """The offline pipeline on SmolLM2-135M-Instruct with the VADER sentiment reward."""
    from .demo_pipeline import demo as _demo

    return _demo(config or DemoConfig(), **kwargs)


def __getattr__(name):
    if name in ("PPOTrainer", "Rollout"):
        from . import ppo_trainer as _ppo_mod

        return getattr(_ppo_mod, name)
    if name in ("LMPolicy", "RewardModel", "build_policy", "load_reward_model"):
        from . import policy as _policy

        return getattr(_policy, name)
    raise AttributeError(name)


__all__ = ["sft", "reward_model", "ppo", "train", "demo", "RLConfig", "LM_RUNGS", "LM_LADDER", "PPOTrainer", "Rollout", "LMPolicy", "RewardModel",
           "build_policy", "load_reward_model", "SFTConfig", "RMConfig", "PPOConfig", "DemoConfig", "ModelOptions"]
