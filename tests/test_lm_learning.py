"""Learning test (slow): PPO on a tiny random model with a checkable reward raises the mean reward clearly
while the KL to the reference stays near the controller's target."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


def share_of_letters(prompts, responses):
    """Checkable reward: the share of lowercase ASCII letters in the response (random byte model: ~26/259
    per token, so most rollout batches carry signal; a single letter such as 'a' (~1/259) left whole
    batches at reward 0 and needed far more than 40 updates)."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


@pytest.mark.slow
def test_ppo_raises_a_checkable_reward_within_minutes(tmp_path):
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import ppo
    from proxrl.lm.tiny import make_tiny

    model = make_tiny(tmp_path / "m", hidden=64, seed=1)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(64)])
    target = 4.0
    cfg = PPOConfig(policy=str(model), reward="unused:fn", prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"),
                    finetune="full", updates=40, batch_size=32, num_minibatches=2, micro_batch_size=16,
                    update_epochs=4, response_length=8, temperature=1.0, lr=3e-3, kl_coef=0.05,
                    target_kl_ref=target, kl_horizon=500, missing_eos_penalty=None, eval_prompts=16)
    s = ppo(cfg, reward=share_of_letters, log=lambda *_: None)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert s["reward_after"] > s["reward_before"] + 0.15
    kl_last = sum(r["kl_ref"] for r in rows[-5:]) / 5
    assert kl_last < 3 * target, kl_last  # near its target: the controller holds it, no blow-up
