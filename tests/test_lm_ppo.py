"""The LM PPO path: EOS handling, reward shaping, whitening, KL controller, micro-batch invariance, and
the token bandit that runs one problem through the gym-shaped and the LM-shaped batch."""

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from proxrl import core, objective
from proxrl.batch import Batch
from proxrl.lm.config import PPOConfig
from proxrl.lm.sampling import InverseCDFSampler
from proxrl.lm.policy import build_policy
from proxrl.lm.loading import left_pad
from proxrl.lm.ppo_trainer import (PPOTrainer, apply_missing_eos_penalty, micro_weight, token_batch, token_rewards,
                           truncate_at_stop)
from proxrl.lm.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def count_a(prompts, responses):
    return [r.count("a") / max(len(r), 1) for r in responses]


def make_trainer(tiny, **kw):
    args = dict(policy=tiny, reward="unused:fn", prompts="unused", out="unused", batch_size=8, num_minibatches=1,
                micro_batch_size=8, update_epochs=1, response_length=6, dtype="float64", finetune="full",
                missing_eos_penalty=None)
    args.update(kw)
    cfg = PPOConfig(**args)
    pol = build_policy(tiny, cfg, cfg.critic)
    return PPOTrainer(cfg, policy=pol, reward=count_a)


# --------------------------------------------------------------------------- EOS (LM-2)
def test_truncate_at_first_stop_token_and_missing_eos_penalty():
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    ids, mask, stopped = truncate_at_stop(resp, [2], pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert apply_missing_eos_penalty(scores, stopped, 1.0).tolist() == [0.5, -0.5, 0.5]
    assert apply_missing_eos_penalty(scores, stopped, None).tolist() == [0.5, 0.5, 0.5]
    # several stop ids (chat models: EOS and end-of-turn)
    _, mask2, stopped2 = truncate_at_stop(torch.tensor([[5, 3, 2]]), [2, 3], pad_id=0)
    assert mask2.tolist() == [[1, 1, 0]] and stopped2.tolist() == [True]


# --------------------------------------------------------------------------- reward shaping (LM-3)
def test_score_lands_on_last_real_response_token_and_kl_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    r = token_rewards(torch.tensor([10.0, 20.0]), kl, mask, kl_coef=0.5)
    want = torch.tensor([[-0.05, -0.1 + 10, 0, 0], [-0.25, -0.3, -0.35, -0.4 + 20]], dtype=torch.float64)
    torch.testing.assert_close(r, want)
    b = token_batch(torch.zeros(2, 4, dtype=torch.long), mask, torch.tensor([True, False]), kl, r,
                    torch.ones(2, 4, dtype=torch.float64))
    assert b.terminated.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert b.truncated.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert b.next_values.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]  # no bootstrap after the last token


def test_score_placement_through_the_trainer(tiny):
    tr = make_trainer(tiny, kl_coef=0.0, norm_adv="off")
    ro = tr.generate(["ab"] * 4)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    batch, _ = tr.make_batch(ro, scores)
    last = ro.response_mask.sum(-1) - 1
    for i in range(4):
        row = batch.rewards[i]
        assert row[last[i]] == scores[i] and row.abs().sum() == scores[i]


# --------------------------------------------------------------------------- whitening (LM-10)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_whitening_never_nan_on_small_batches(n):
    for x in (torch.randn(1, n), torch.full((1, n), 3.0)):
        mask = torch.ones_like(x)
        for shift in (True, False):
            out = core.masked_whiten(x, mask, shift_mean=shift)
            assert torch.isfinite(out).all()
        assert torch.isfinite(objective.normalize_advantages(x, mask, "whiten")).all()


def test_trainer_refuses_reward_whitening_on_tiny_batch(tiny):
    tr = make_trainer(tiny, whiten_rewards=True, batch_size=1, response_length=2)
    ro = tr.generate(["ab"])
    batch, stats = tr.make_batch(ro, torch.tensor([1.0]))
    assert stats["rewards_whitened"] == 0.0
    assert torch.isfinite(batch.adv).all() and torch.isfinite(batch.rewards).all()


# --------------------------------------------------------------------------- adaptive KL (LM-9)
def test_ziegler_controller_matches_formula():
    assert core.ziegler_beta_update(0.1, 12.0, 6.0, 16, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.16))
    assert core.ziegler_beta_update(0.1, 6.6, 6.0, 16, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.16))
    assert core.ziegler_beta_update(0.1, 0.0, 6.0, 16, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.16))


def test_a_horizon_that_would_turn_beta_negative_is_refused():
    # batch 8, horizon 1: a KL below target (0 at the start) multiplied β by 1 − 0.2·8 = −0.6, so the
    # penalty −β·KL became a bonus for moving away from the reference (0.05 → −0.03 → 0.018 → …)
    from proxrl.errors import ConfigError

    for horizon in (1, 2):  # 2: factor exactly 0, β stuck at 0 for good
        cfg = PPOConfig(policy="p", reward="x:y", batch_size=10, kl_horizon=horizon)
        with pytest.raises(ConfigError, match=r"^kl_horizon: .*β by 1 − 0\.2·batch_size/kl_horizon = .*--kl-horizon > 2,"):
            cfg.validate(need_prompts=False)
    PPOConfig(policy="p", reward="x:y", batch_size=10, kl_horizon=3).validate(need_prompts=False)
    PPOConfig(policy="p", reward="x:y", batch_size=10, kl_horizon=1, adaptive_kl=False).validate(need_prompts=False)
    with pytest.raises(ValueError, match="horizon > n_steps/5"):
        core.ziegler_beta_update(0.05, 0.0, 6.0, 8, 1)


def test_trainer_applies_the_controller_once_per_update(tiny):
    tr = make_trainer(tiny, kl_coef=0.2, target_kl_ref=0.01, kl_horizon=40, lr=1e-2)
    for _ in range(2):
        ro = tr.generate(["ab"] * 8)
        m = tr.step(ro, tr.score(ro))
        err = min(max(m["kl_ref"] / 0.01 - 1, -0.2), 0.2)
        assert m["beta_next"] == pytest.approx(m["beta"] * (1 + err * 8 / 40))
        assert tr.kl_coef == m["beta_next"]


# --------------------------------------------------------------------------- batch hierarchy (LM-12)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_micro_batch_8x1_equals_1x8(tiny, agg):
    tr = make_trainer(tiny, loss_agg=agg, vf_clip=0.2, ent_coef=0.01, response_length=8, kl_coef=0.1)
    ro = tr.generate([f"p{i}" for i in range(8)])  # prompts of different length: real left padding
    scores = torch.linspace(-1, 1, 8, dtype=torch.float64)
    batch, _ = tr.make_batch(ro, scores)
    ids, mask = ro.ids, ro.mask
    rows = torch.arange(8)
    grads, params_after = {}, {}
    init = copy.deepcopy(tr.policy.state_dict())
    for micro in (1, 8):
        tr.policy.load_state_dict(init)
        tr.optimizer = torch.optim.Adam([p for p in tr.policy.parameters() if p.requires_grad], lr=1e-3)
        tr.cfg.micro_batch_size = micro
        tr.optimizer.zero_grad(set_to_none=True)
        tr.accumulate(batch, ids, mask, rows)
        grads[micro] = torch.cat([p.grad.reshape(-1) for p in tr.policy.parameters() if p.grad is not None])
        tr.optimizer.step()
        params_after[micro] = torch.cat([p.detach().reshape(-1) for p in tr.policy.parameters() if p.requires_grad])
    torch.testing.assert_close(grads[1], grads[8], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(params_after[1], params_after[8], atol=1e-6, rtol=0)


def test_step_takes_scores_as_a_list_an_array_or_a_tensor_and_refuses_the_wrong_count(tiny):
    """PPOTrainer.step(rollout, scores): one real number per response, in any of the usual containers, gives
    the same update; a single score (it used to be broadcast to every response) or a wrong count is one line."""
    import numpy as np

    from proxrl.errors import ConfigError

    prompts = ["ab", "xyz", "q", "hello"] * 2
    out = {}
    for kind in ("tensor", "list", "array"):
        torch.manual_seed(0)  # the value head's initialisation
        tr = make_trainer(tiny)
        rollout = tr.generate(prompts)
        raw = tr.score(rollout)
        given = {"tensor": raw, "list": raw.tolist(), "array": raw.numpy()}[kind]
        tr.step(rollout, given)
        out[kind] = [p.detach().clone() for p in tr.policy.parameters() if p.requires_grad]
        for bad in (raw[:1], raw.tolist() + [0.0], np.zeros((8, 1)), "0.5"):
            with pytest.raises(ConfigError, match="^scores: "):
                tr.step(rollout, bad)
    for kind in ("list", "array"):
        assert all(torch.equal(a, b) for a, b in zip(out["tensor"], out[kind]))


def test_step_refuses_a_rollout_with_ids_beyond_the_tokenizer(tiny):
    """A rollout built outside proxrl (another engine) holding an id the policy's tokenizer does not have —
    a padded embedding row, or an id past the embedding — was an index error inside the update; now one
    line naming the id, the weights untouched."""
    from proxrl.errors import ConfigError

    tr = make_trainer(tiny)
    rollout = tr.generate(["ab", "xyz", "q", "hello"] * 2)
    before = [p.detach().clone() for p in tr.policy.parameters() if p.requires_grad]
    rollout.response_ids[3, 0] = len(tr.policy.tokenizer)
    with pytest.raises(ConfigError, match=r"^rollout: holds token id 259, beyond the policy's 259 token ids"):
        tr.step(rollout, [0.0] * len(rollout))
    assert all(torch.equal(a, p) for a, p in zip(before, (p for p in tr.policy.parameters() if p.requires_grad)))


def test_micro_weight_sums_to_one():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.float64)
    for agg in ("token-mean", "seq-mean"):
        assert sum(micro_weight(mask[i:i + 1], mask, agg) for i in range(4)) == pytest.approx(1.0)


def test_ratio_is_one_on_first_minibatch_of_first_epoch(tiny):
    tr = make_trainer(tiny, micro_batch_size=3)
    ro = tr.generate([f"prompt {i}" for i in range(8)])
    batch, _ = tr.make_batch(ro, torch.randn(8, dtype=torch.float64))
    sums = tr.accumulate(batch, ro.ids, ro.mask, torch.arange(8))
    assert abs(sums["ratio_max"] - 1.0) < 1e-12 and abs(sums["approx_kl"]) < 1e-12
    assert sums["clip_fraction"] == 0.0


def test_generation_and_training_forward_agree(tiny):
    """The KV-cached sampler and the padded training forward score the sampled tokens identically
    (temperature-scaled, full distribution): the behaviour policy is the optimised one (LM-5, LM-6)."""
    tr = make_trainer(tiny, temperature=0.8)
    prompts = ["a", "abcdef", "xyz"]
    q_ids, q_mask = left_pad(tr.encode(prompts), tr.pad_id)
    torch.manual_seed(0)
    out = tr.policy.lm.generate(input_ids=q_ids, attention_mask=q_mask, max_new_tokens=5, do_sample=True,
                                temperature=0.8, top_k=0, top_p=1.0, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=tr.pad_id, eos_token_id=[999])
    resp = out.sequences[:, q_ids.shape[1]:]
    gen_logp = torch.stack([torch.log_softmax(s, -1).gather(-1, resp[:, t:t + 1]).squeeze(-1)
                            for t, s in enumerate(out.scores)], 1)
    ids = torch.cat([q_ids, resp], 1)
    mask = torch.cat([q_mask, torch.ones_like(resp)], 1)
    logp, _, _ = tr.policy(ids, mask, resp.shape[1], 0.8)
    # generate() keeps its scores in float32, hence 1e-5 and not 1e-10
    torch.testing.assert_close(logp, gen_logp.to(logp.dtype), atol=1e-5, rtol=0)


def test_inverse_cdf_sampler_is_exact():
    """InverseCDFSampler draws from softmax(logits / T): frequencies over 200k draws within 4.5 σ of the
    probabilities, a −inf logit is never drawn, and as a logits processor it leaves exactly one finite
    logit (0) per row at the drawn token, which greedy decoding takes."""
    logits = torch.tensor([[2.0, 0.5, -1.0, float("-inf"), 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, -30.0]])
    T, n = 0.7, 100_000
    sampler = InverseCDFSampler(T, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.double() / T, -1)
    for row in range(2):
        draws = sampler.draw(logits[row:row + 1].expand(n, -1))
        freq = torch.bincount(draws, minlength=6).double() / n
        sigma = (p[row] * (1 - p[row]) / n).sqrt()
        assert ((freq - p[row]).abs() <= 4.5 * sigma + 1e-12).all(), (row, freq, p[row])
    assert (sampler.draw(logits[:1].expand(n, -1)) != 3).all()
    out = sampler(None, logits)
    assert (torch.isfinite(out).sum(-1) == 1).all() and (out.max(-1).values == 0).all()


def test_trainer_generate_samples_each_token_from_the_policy(tiny):
    """trainer.generate (KV cache, greedy decoding over the sampler's one-hot logits) gives, for a seed,
    exactly the tokens of a plain loop that runs the full padded forward at every step and draws from
    softmax(logits / T) with the same uniforms: the behaviour policy is π_θ at the temperature (LM-5, LM-6)."""
    from proxrl.lm.policy import forward

    tr = make_trainer(tiny, temperature=0.8, response_length=12)
    prompts = ["a", "abcdef", "xyz", "hello world"]
    ro = tr.generate(prompts, seed=123)
    q_ids, q_mask = left_pad(tr.encode(prompts), tr.pad_id)
    torch.manual_seed(123)
    sampler, ids, mask = InverseCDFSampler(0.8), q_ids, q_mask
    with torch.no_grad():
        for _ in range(12):
            logits, _ = forward(tr.policy.lm, ids, mask, 1)
            tok = sampler.draw(logits[:, -1])
            ids, mask = torch.cat([ids, tok[:, None]], 1), torch.cat([mask, torch.ones_like(tok[:, None])], 1)
    resp_ids, resp_mask, stopped = truncate_at_stop(ids[:, q_ids.shape[1]:], tr.stop_ids, tr.pad_id)
    R = ro.response_ids.shape[1]  # generate() ends early once every row has stopped
    assert torch.equal(ro.response_ids, resp_ids[:, :R]) and torch.equal(ro.response_mask, resp_mask[:, :R])
    assert torch.equal(ro.stopped, stopped)
    assert len({tuple(r.tolist()) for r in ro.response_ids}) > 1  # rows are sampled, not copies


def test_update_improves_the_checkable_reward_direction(tiny):
    """One large-lr update on a fixed rollout moves log-probs the way the advantages say."""
    tr = make_trainer(tiny, lr=1e-3, update_epochs=4, kl_coef=0.0)
    ro = tr.generate([f"q{i}" for i in range(8)])
    scores = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    logp_before, _, _ = tr.policy(ro.ids, ro.mask, ro.response_ids.shape[1])
    tr.step(ro, scores)
    logp_after, _, _ = tr.policy(ro.ids, ro.mask, ro.response_ids.shape[1])
    gain = ((logp_after - logp_before) * ro.response_mask).sum(-1).detach()
    assert gain[0::2].mean() > gain[1::2].mean()


# --------------------------------------------------------------------------- the shared core
def test_token_bandit_gym_and_lm_paths_give_identical_advantages_and_losses(tiny):
    """One problem twice: a one-step Gymnasium bandit whose actions are vocabulary tokens, and a fake LM
    answering with one token. The gym batch is built by a plain Gymnasium env loop (independent of the LM
    rollout code); the LM batch by the LM rollout code. Same advantages, returns and losses."""
    gym = pytest.importorskip("gymnasium")
    tr = make_trainer(tiny, response_length=1, kl_coef=0.0, norm_adv="off", temperature=0.9)
    tok = tr.policy.tokenizer

    def reward_of_token(a: int) -> float:
        text = tok.decode([a], skip_special_tokens=True)
        return float(ord(text[0]) % 7) if text else -1.0

    def lm_reward(prompts, responses):
        return [float(ord(r[0]) % 7) if r else -1.0 for r in responses]

    tr.scorer.fn = lm_reward

    class TokenBandit(gym.Env):
        observation_space = gym.spaces.Box(0, 1, (1,))
        action_space = gym.spaces.Discrete(len(tok))

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            return [0.0], {}

        def step(self, action):
            return [0.0], reward_of_token(int(action)), True, False, {}

    B = 8
    ro = tr.generate(["hi"] * B)
    lm_batch, _ = tr.make_batch(ro, tr.score(ro))
    lm_batch = objective.estimate_advantages(lm_batch, "gae", 1.0, 0.95)  # re-estimate (no normalisation)

    # gym side: the policy over Discrete(V) is the LM's next-token distribution after the prompt
    q = torch.tensor([tr.encode(["hi"])[0]])
    with torch.no_grad():
        out = tr.policy.lm(input_ids=q, output_hidden_states=True)
        dist_logp = torch.log_softmax(out.logits[0, -1] / 0.9, -1)
        value = tr.policy.value_head(out.hidden_states[-1][0, -1]).squeeze(-1)
    env = TokenBandit()
    rewards, terms, logp_old = [], [], []
    for b in range(B):
        env.reset(seed=b)
        a = int(ro.response_ids[b, 0])
        _, r, term, trunc, _ = env.step(a)
        rewards.append(r), terms.append(float(term)), logp_old.append(dist_logp[a])
    f64 = torch.float64
    gym_batch = Batch(obs=torch.zeros(B, 1, 1), actions=ro.response_ids[:, :1], logp_old=torch.stack(logp_old)[:, None],
                      rewards=torch.tensor(rewards, dtype=f64)[:, None], terminated=torch.tensor(terms)[:, None],
                      truncated=torch.zeros(B, 1), mask=torch.ones(B, 1, dtype=f64),
                      values=value.expand(B)[:, None].clone(), next_values=torch.zeros(B, 1, dtype=f64))
    gym_batch = objective.estimate_advantages(gym_batch, "gae", 1.0, 0.95)
    torch.testing.assert_close(lm_batch.logp_old, gym_batch.logp_old, atol=1e-10, rtol=0)
    torch.testing.assert_close(lm_batch.rewards, gym_batch.rewards)
    torch.testing.assert_close(lm_batch.adv, gym_batch.adv, atol=1e-10, rtol=0)
    torch.testing.assert_close(lm_batch.ret, gym_batch.ret, atol=1e-10, rtol=0)

    # move the policy, then the same new log-probs through both batches give the same losses
    with torch.no_grad():
        for p in tr.policy.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
        new_lm, _, _ = tr.policy(ro.ids, ro.mask, 1, 0.9)
        new_dist = torch.log_softmax(tr.policy.lm(input_ids=q).logits[0, -1] / 0.9, -1)
    new_gym = new_dist[ro.response_ids[:, 0]][:, None]
    torch.testing.assert_close(new_lm, new_gym, atol=1e-10, rtol=0)
    for surrogate in ("clip", "kl-penalty", "is", "vanilla"):
        l_lm, s_lm = objective.surrogate_loss(surrogate, new_lm, lm_batch.logp_old, lm_batch.adv, lm_batch.mask, beta=0.5)
        l_gym, s_gym = objective.surrogate_loss(surrogate, new_gym, gym_batch.logp_old, gym_batch.adv, gym_batch.mask, beta=0.5)
        torch.testing.assert_close(l_lm, l_gym, atol=1e-10, rtol=0)
        for k in s_lm:
            torch.testing.assert_close(s_lm[k], s_gym[k], atol=1e-10, rtol=0)


def test_checkpoint_state_is_a_snapshot_that_later_steps_leave_as_it_is(tiny):
    """``checkpoint_state()`` kept in memory (to roll back, or keep the best) used to hold views of the live
    weights and Adam moments: the next step changed 88 of its 89 tensors, so loading it restored the current
    trainer, not the one checkpointed. Now a snapshot: loaded into a fresh trainer and stepped, it gives the
    uninterrupted run's metrics and weights."""
    import copy

    prompts = ["ab", "a much longer prompt", "q", "hello"]

    def run(tr, n):
        out = []
        for _ in range(n):
            r = tr.generate(prompts)
            out.append(tr.step(r, tr.score(r)))
        return out

    torch.manual_seed(0)
    a = make_trainer(tiny, batch_size=4, micro_batch_size=4)
    run(a, 1)
    tensors, state = a.checkpoint_state()
    state = copy.deepcopy(state)
    frozen = {k: v.clone() for k, v in tensors.items()}
    later = run(a, 2)
    assert all(torch.equal(tensors[k], frozen[k]) for k in frozen)
    torch.manual_seed(0)
    b = make_trainer(tiny, batch_size=4, micro_batch_size=4)
    b.load_checkpoint_state(tensors, state)
    again = run(b, 2)
    for m, n in zip(later, again):
        assert {k: v for k, v in m.items() if "time" not in k} == {k: v for k, v in n.items() if "time" not in k}
    wa, wb = a.policy.trainable_state(), b.policy.trainable_state()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_step_refuses_a_rollout_sampled_before_an_update(tiny):
    """``step`` twice on one rollout, or on a rollout sampled before another update, trained on another
    policy's tokens as the current one's (ratio 1, approx_kl 0: no correction) without a word. Now one line;
    the weights untouched. A rollout carrying its sampler's log-probs (``logp_behaviour``) is still taken."""
    from proxrl.errors import ConfigError

    tr = make_trainer(tiny, batch_size=4, micro_batch_size=4)
    prompts = ["ab", "xyz", "q", "hello"]
    old = tr.generate(prompts)
    tr.step(old, tr.score(old))
    before = [p.detach().clone() for p in tr.policy.parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match="^rollout: was sampled by the policy as it was after update 0; "):
        tr.step(old, tr.score(old))
    assert all(torch.equal(p, q) for p, q in zip(before, (p for p in tr.policy.parameters() if p.requires_grad)))
    assert tr.step_count == 1
    fresh = tr.generate(prompts)
    assert tr.step(fresh, tr.score(fresh))["step"] == 2
    old.logp_behaviour = torch.zeros(old.response_ids.shape, dtype=torch.float64)  # an off-policy sampler's
    assert tr.step(old, tr.score(old))["step"] == 3


def test_generate_and_evaluate_take_a_list_of_prompt_strings(tiny):
    """``generate("hello")`` sampled one response per character (5 prompts "h", "e", …) and ``evaluate`` the
    same, without a word; ``generate([])`` was a ValueError from deep in the sampler. Now one line each; a
    tuple of strings is still a list of prompts, and ``evaluate([])`` still gives its empty result."""
    from proxrl.errors import ConfigError

    tr = make_trainer(tiny, batch_size=4, micro_batch_size=4)
    for call in (lambda: tr.generate("hello"), lambda: tr.evaluate("hello"), lambda: tr.generate([]),
                 lambda: tr.generate(["ab", 3]), lambda: tr.generate([{"prompt": "ab"}])):
        with pytest.raises(ConfigError, match="^prompts: (generate|evaluate)\\(\\) "):
            call()
    assert len(tr.generate(("ab", "c"))) == 2
    assert tr.evaluate([])["responses"] == []
