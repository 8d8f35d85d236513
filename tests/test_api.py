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
