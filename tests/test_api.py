"""The public Python API stays what the README shows, whatever submodules were imported before."""

from __future__ import annotations



def test_functions_are_not_shadowed_by_submodules():
    import proxrl
    import proxrl.lm
    import proxrl.lm.ppo_trainer  # noqa: F401
    import proxrl.lm.sft_trainer  # noqa: F401
    import proxrl.lm.demo_pipeline  # noqa: F401
    import proxrl.gym.trainer  # noqa: F401

    for f in (proxrl.train, proxrl.load, proxrl.evaluate, proxrl.lm.ppo, proxrl.lm.sft, proxrl.lm.demo,
              proxrl.lm.reward_model):
        assert callable(f) and not hasattr(f, "__path__") and type(f).__name__ == "function"
    from proxrl.lm import PPOTrainer  # the step-wise form

    assert PPOTrainer.__name__ == "PPOTrainer"


def test_stepwise_loop_from_the_readme(tmp_path):
    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.tiny import make_tiny

    model = make_tiny(tmp_path / "tiny")
    reward = lambda ps, rs: [r.count("e") / max(1, len(r)) for r in rs]
    # the step-wise trainer needs no prompts file: the caller brings the prompts
    trainer = PPOTrainer(PPOConfig(policy=str(model), batch_size=8, micro_batch_size=4, response_length=8),
                         reward=reward)
    rollout = trainer.generate([f"hello {i}" for i in range(8)])
    scores = trainer.score(rollout)
    metrics = trainer.step(rollout, scores)
    for key in ("reward_mean", "kl_ref", "beta", "approx_kl", "clip_fraction", "value_loss", "entropy"):
        assert key in metrics
    assert 0 < metrics["forward_time"] < metrics["update_time"]
    assert abs(metrics["forward_time"] + metrics["train_time"] - metrics["update_time"]) < 1e-9
    assert metrics["approx_kl"] >= 0


def test_lm_configs_refuse_values_of_the_wrong_type_in_one_line():
    """Through the Python API nothing checked an LM config value's type (tyro does on the command line):
    a string or None for a number was a TypeError traceback inside validate(), a float where an int belongs
    (batch_size=8.5) or any string for a Literal field (on_nonfinite='Skip' ran as 'stop', finetune='LoRA',
    surrogate='bogus') or a bool field was accepted. Now one ConfigError naming the field, for every config
    class; the defaults and valid values still pass."""
    import pytest

    from proxrl.errors import ConfigError
    from proxrl.lm.config import DemoConfig, LMLadderConfig, PPOConfig, RLConfig, RMConfig, SFTConfig

    ppo = dict(policy="m", reward="r:f", prompts="p")
    sup = dict(model="m", data="d")
    cases = [(PPOConfig, ppo, "batch_size", "8"), (PPOConfig, ppo, "batch_size", 8.5), (PPOConfig, ppo, "lr", None),
             (PPOConfig, ppo, "on_nonfinite", "Skip"), (PPOConfig, ppo, "surrogate", "bogus"),
             (PPOConfig, ppo, "adaptive_kl", "no"), (PPOConfig, ppo, "seed", "1"), (PPOConfig, ppo, "updates", True),
             (PPOConfig, ppo, "finetune", "LoRA"), (PPOConfig, ppo, "lora_target", None),
             (RLConfig, ppo, "algo", ["grpo"]), (RLConfig, ppo, "samples_per_prompt", 2.0),
             (RLConfig, ppo, "max_kl", "0.01"), (SFTConfig, sup, "epochs", None), (RMConfig, sup, "eval_fraction", "0.1"),
             (DemoConfig, {}, "quick", "yes"), (DemoConfig, {}, "seed", None),
             (LMLadderConfig, {}, "seeds", "2")]
    for cls, base, name, bad in cases:
        with pytest.raises(ConfigError, match=f"^{name}: must be "):
            cls(**base, **{name: bad}).validate()
    for cls, base in ((PPOConfig, ppo), (RLConfig, dict(ppo, algo="grpo")), (SFTConfig, sup), (RMConfig, sup),
                      (DemoConfig, {}), (LMLadderConfig, {})):
        cls(**base).validate()
    PPOConfig(**ppo, lora_alpha=16, vf_clip=None, missing_eos_penalty=None).validate()  # an int for a float, None
    LMLadderConfig(algos=["grpo", "rloo"]).validate()  # a list where the annotation says tuple: what the message asks for
    with pytest.raises(ConfigError, match="^algos: must be a list of strings"):
        LMLadderConfig(algos=["grpo", 3]).validate()
