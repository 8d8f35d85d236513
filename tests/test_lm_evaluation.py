"""The demo's paired before/after evaluation: statistics and repetition measures by hand, and the common
sampling streams on a tiny model (the same policy evaluated twice gives exactly the same responses, so an
untrained policy shows a paired improvement of exactly 0)."""

import math
import statistics

import pytest

from proxrl.lm.evaluation import degeneration, distinct_n, paired_stats, repeated_ngram_fraction, words


def test_paired_stats_by_hand():
    before = [[0.0, 0.2], [0.5, 0.5], [-1.0, 0.0]]   # per-prompt means 0.1, 0.5, -0.5
    after = [[0.4, 0.4], [0.5, 0.7], [0.0, 0.0]]      # per-prompt means 0.4, 0.6, 0.0
    s = paired_stats(before, after)
    d = [0.3, 0.1, 0.5]
    assert s["n_prompts"] == 3 and s["samples_per_prompt"] == 2
    assert s["per_prompt_before"] == pytest.approx([0.1, 0.5, -0.5])
    assert s["before"] == pytest.approx(0.1 / 3) and s["after"] == pytest.approx(1.0 / 3)
    assert s["delta"] == pytest.approx(0.3)
    assert s["delta_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))  # ddof = 1
    assert s["delta_se"] == pytest.approx(0.2 / math.sqrt(3))
    assert s["ratio"] == pytest.approx(0.3 / (0.2 / math.sqrt(3)))
    assert s["before_se"] == pytest.approx(statistics.stdev([0.1, 0.5, -0.5]) / math.sqrt(3))


def test_paired_stats_pairing_removes_the_between_prompt_spread():
    """A constant shift on prompts of very different levels: unpaired error bars are wide, the paired
    difference has no spread at all."""
    before = [[x] for x in (-0.9, -0.2, 0.4, 0.9)]
    after = [[x + 0.05] for x in (-0.9, -0.2, 0.4, 0.9)]
    s = paired_stats(before, after)
    assert s["delta"] == pytest.approx(0.05) and s["delta_se"] == pytest.approx(0.0, abs=1e-12)
    assert s["before_se"] > 0.3


def test_paired_stats_edge_cases():
    assert paired_stats([[1.0], [2.0]], [[1.0], [2.0]])["ratio"] != paired_stats([[1.0], [2.0]], [[1.0], [2.0]])["ratio"]  # NaN: 0/0
    assert paired_stats([[0.0], [0.0]], [[1.0], [1.0]])["ratio"] == math.inf
    assert math.isnan(paired_stats([[0.0]], [[1.0]])["delta_se"])  # one prompt: no standard error
    with pytest.raises(ValueError):
        paired_stats([[0.0]], [[0.0], [1.0]])
    with pytest.raises(ValueError):
        paired_stats([[0.0, 1.0], [0.0]], [[0.0, 1.0], [0.0]])  # ragged K
    with pytest.raises(ValueError):
        paired_stats([], [])


def test_repetition_measures_by_hand():
    assert words("It's a GREAT film, great!") == ["it", "s", "a", "great", "film", "great"]
    assert repeated_ngram_fraction("a lovely film with a lovely cast", 3) == 0.0
    # "great great great great great": 3 word 3-grams, all the same → 2 of 3 repeat an earlier one
    assert repeated_ngram_fraction("great great great great great", 3) == pytest.approx(2 / 3)
    assert repeated_ngram_fraction("too short", 3) == 0.0
    loop = " ".join(["so good"] * 20)
    assert repeated_ngram_fraction(loop, 3) > 0.9
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert math.isnan(distinct_n(["", "x"], 2))
    d = degeneration(["a lovely film", loop])
    assert d["looping_fraction"] == 0.5 and d["words_per_response"] == pytest.approx((3 + 40) / 2)


pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.ppo_trainer import PPOTrainer
    from proxrl.lm.tiny import make_tiny

    tiny = str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))
    cfg = PPOConfig(policy=tiny, reward="x:y", finetune="lora", lora_r=4, chat_template="off", response_length=8,
                    temperature=0.7, forward_batch_size=3)
    return PPOTrainer(cfg, reward=lambda p, r: [float(len(x)) for x in r])


def test_same_policy_same_streams_zero_paired_delta(trainer):
    from proxrl.lm.evaluation import generate_eval, score_eval, token_stats

    prompts = ["the film", "a story of", "it is", "my review:", "so"]
    a = generate_eval(trainer, prompts, 2, seed=7)
    trainer.generate(prompts[:2], seed=99)  # anything in between draws from the global generator
    b = generate_eval(trainer, prompts, 2, seed=7)
    assert [r.responses for r in a] == [r.responses for r in b]
    assert a[0].responses != a[1].responses  # the K samples are different streams
    s = paired_stats(score_eval(trainer.scorer, a), score_eval(trainer.scorer, b))
    assert s["delta"] == 0.0 and s["delta_se"] == 0.0 and s["samples_per_prompt"] == 2
    st = token_stats(trainer.policy, a, 0.7, chunk=3)
    # an untrained LoRA policy is its reference (the adapters start at zero): KL exactly 0
    assert st["kl_ref"] == 0.0 and st["ref_nll"] > 0 and 0 < st["response_tokens"] <= 8


def test_ref_token_logp_matches_ref_logp(trainer):
    import torch
    from proxrl.lm.evaluation import ref_token_logp

    r = trainer.generate(["the film", "a story of"], seed=3)
    R = r.response_ids.shape[1]
    with torch.no_grad():
        both = ref_token_logp(trainer.policy, r.ids, r.mask, R, [0.7, 1.0])
        for lp, t in zip(both, (0.7, 1.0)):
            torch.testing.assert_close(lp, trainer.policy.ref_logp(r.ids, r.mask, R, t))
