"""Unit tests of the ladder's pure math (:mod:`proxrl.core`, :mod:`proxrl.objective`).

Every vectorised function is checked against a naive twin written here independently (plain Python loops
over episodes, on random inputs with random ``terminated``/``truncated`` flags), against small analytic
cases, and against the identities between rungs listed in STYLE.md.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.distributions import Categorical, Independent, Normal

from proxrl import core, objective
from proxrl.batch import Batch

torch.set_num_threads(1)

HYP = settings(max_examples=40, deadline=None, database=None, derandomize=True)


# --------------------------------------------------------------------------- naive twins (plain Python)
def _segments(done_row: list[bool]) -> list[tuple[int, int]]:
    """Split ``range(T)`` into [start, end] segments, each ending at a done step or at T - 1."""
    segs, start = [], 0
    for t, d in enumerate(done_row):
        if d or t == len(done_row) - 1:
            segs.append((start, t))
            start = t + 1
    return segs


def naive_reward_to_go(rewards, terminated, truncated, next_values, gamma):
    """G_t = Σ_{k=t}^{end} γ^{k-t} r_k + γ^{end-t+1}·bootstrap; bootstrap = V(s_{end+1}) unless terminated."""
    B, T = len(rewards), len(rewards[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        done = [bool(terminated[b][t]) or bool(truncated[b][t]) for t in range(T)]
        for start, end in _segments(done):
            boot = 0.0 if (terminated[b][end] or next_values is None) else next_values[b][end]
            for t in range(start, end + 1):
                g = sum(gamma ** (k - t) * rewards[b][k] for k in range(t, end + 1))
                out[b][t] = g + gamma ** (end - t + 1) * boot
    return out


def naive_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """A_t = Σ_{k=t}^{end} (γλ)^{k-t} δ_k with δ_k = r_k + γ(1 − term_k)V(s_{k+1}) − V(s_k)."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        done = [bool(terminated[b][t]) or bool(truncated[b][t]) for t in range(T)]
        delta = [rewards[b][k] + gamma * (0.0 if terminated[b][k] else next_values[b][k]) - values[b][k]
                 for k in range(T)]
        for start, end in _segments(done):
            for t in range(start, end + 1):
                adv[b][t] = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, end + 1))
    return adv


def naive_total_return(rewards, terminated, truncated, mask, gamma):
    """R(τ) = Σ_k γ^{k-start} r_k of the episode segment of each real step (masked steps belong to none);
    returns a dict {(b, t): R} over the real steps only."""
    B, T = len(rewards), len(rewards[0])
    out = {}
    for b in range(B):
        seg: list[int] = []

        def close():
            R = sum(gamma ** i * rewards[b][k] for i, k in enumerate(seg))
            for k in seg:
                out[(b, k)] = R
            seg.clear()

        for t in range(T):
            if not mask[b][t]:
                close()  # an autoreset step: whatever came before is over
                continue
            seg.append(t)
            if terminated[b][t] or truncated[b][t]:
                close()
        close()
    return out


def random_episodes(B, T, seed, p_term=0.15, p_trunc=0.1, autoreset=True, dtype=torch.float64):
    """Random rewards, values and flags; with ``autoreset`` the step after a done is sometimes a masked reset
    step with reward 0 (Gymnasium NEXT_STEP), and a rollout may start on one."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    next_values = torch.randn(B, T, generator=g, dtype=dtype)
    terminated = (torch.rand(B, T, generator=g) < p_term).to(dtype)
    truncated = (torch.rand(B, T, generator=g) < p_trunc).to(dtype)
    mask = torch.ones(B, T, dtype=dtype)
    if autoreset:
        coin = torch.rand(B, T, generator=g) < 0.5
        for b in range(B):
            for t in range(T):
                prev_done = (t == 0) or terminated[b, t - 1] > 0 or truncated[b, t - 1] > 0
                if prev_done and coin[b, t]:
                    mask[b, t] = 0.0
                    rewards[b, t] = 0.0
                    terminated[b, t] = 0.0
                    truncated[b, t] = 0.0
    return rewards, values, next_values, terminated, truncated, mask


def L(x):
    return x.tolist()


# --------------------------------------------------------------------------- reward-to-go and GAE vs loops
@HYP
@given(B=st.integers(1, 3), T=st.integers(1, 12), seed=st.integers(0, 10_000), gamma=st.floats(0.0, 1.0),
       bootstrap=st.booleans())
def test_reward_to_go_matches_loop_twin(B, T, seed, gamma, bootstrap):
    r, _, nv, term, trunc, _ = random_episodes(B, T, seed, p_term=0.2, p_trunc=0.2, autoreset=False)
    nv = nv if bootstrap else None
    got = core.reward_to_go(r, term, trunc, nv, gamma)
    want = torch.tensor(naive_reward_to_go(L(r), L(term), L(trunc), None if nv is None else L(nv), gamma),
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@HYP
@given(B=st.integers(1, 3), T=st.integers(1, 12), seed=st.integers(0, 10_000), gamma=st.floats(0.0, 1.0),
       lam=st.floats(0.0, 1.0))
def test_gae_matches_loop_twin(B, T, seed, gamma, lam):
    r, v, nv, term, trunc, _ = random_episodes(B, T, seed, p_term=0.2, p_trunc=0.2, autoreset=False)
    adv, ret = core.gae(r, v, nv, term, trunc, gamma, lam)
    want = torch.tensor(naive_gae(L(r), L(v), L(nv), L(term), L(trunc), gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, adv + v)  # TD(λ) targets


def test_gae_accepts_bool_flags():
    r, v, nv, term, trunc, _ = random_episodes(3, 9, seed=1, autoreset=False, dtype=torch.float32)
    a_f, _ = core.gae(r, v, nv, term, trunc, 0.9, 0.8)
    a_b, _ = core.gae(r, v, nv, term.bool(), trunc.bool(), 0.9, 0.8)
    torch.testing.assert_close(a_f, a_b)
    torch.testing.assert_close(core.reward_to_go(r, term, trunc, nv, 0.9),
                               core.reward_to_go(r, term.bool(), trunc.bool(), nv, 0.9))


@pytest.mark.parametrize("gamma", [1.0, 0.97, 0.5])
def test_gae_lambda1_zero_values_is_reward_to_go(gamma):
    r, _, _, term, trunc, _ = random_episodes(4, 30, seed=2, autoreset=False)
    zeros = torch.zeros_like(r)
    adv, ret = core.gae(r, zeros, zeros, term, trunc, gamma, 1.0)
    rtg = core.reward_to_go(r, term, trunc, None, gamma)
    torch.testing.assert_close(adv, rtg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, rtg, rtol=1e-12, atol=1e-12)


def test_gae_lambda1_is_reward_to_go_minus_values():
    """With a critic, GAE(λ=1) = bootstrapped discounted reward-to-go − V (MISSION rung 3)."""
    r, v, nv, term, trunc, _ = random_episodes(4, 30, seed=3, autoreset=False)
    # a consistent critic: inside an episode V(s_{t+1}) is the next step's value (the sum telescopes);
    # after a done, next_values is V(final obs), which differs from the reset obs' value
    done = torch.maximum(term, trunc)
    nv[:, :-1] = torch.where(done[:, :-1] > 0, nv[:, :-1], v[:, 1:])
    adv, _ = core.gae(r, v, nv, term, trunc, 0.95, 1.0)
    torch.testing.assert_close(adv, core.reward_to_go(r, term, trunc, nv, 0.95) - v, rtol=1e-10, atol=1e-10)


def test_gae_lambda0_is_one_step_td_error():
    r, v, nv, term, trunc, _ = random_episodes(4, 30, seed=4, autoreset=False)
    gamma = 0.9
    adv, _ = core.gae(r, v, nv, term, trunc, gamma, 0.0)
    td = r + gamma * (1.0 - term) * nv - v
    torch.testing.assert_close(adv, td, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- truncation vs termination
def test_truncation_bootstraps_termination_does_not_analytic():
    """3 steps, rewards 1, 2, 3, γ = 0.5, the episode ends at the last step. V(final obs) = 10."""
    gamma = 0.5
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    nv = torch.tensor([[7.0, 8.0, 10.0]], dtype=torch.float64)  # nv[0], nv[1] = V(s_2), V(s_3)
    v = torch.tensor([[4.0, 5.0, 6.0]], dtype=torch.float64)
    flag = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    none = torch.zeros_like(flag)

    # reward-to-go
    trunc_rtg = core.reward_to_go(r, none, flag, nv, gamma)  # time limit: + γ·10 at the end
    term_rtg = core.reward_to_go(r, flag, none, nv, gamma)   # terminal: nothing after
    g2_tr, g2_te = 3 + 0.5 * 10, 3.0
    assert trunc_rtg.tolist() == [[1 + 0.5 * (2 + 0.5 * g2_tr), 2 + 0.5 * g2_tr, g2_tr]]
    assert term_rtg.tolist() == [[1 + 0.5 * (2 + 0.5 * g2_te), 2 + 0.5 * g2_te, g2_te]]
    assert trunc_rtg.tolist() == [[4.0, 6.0, 8.0]] and term_rtg.tolist() == [[2.75, 3.5, 3.0]]
    # both flags (Gymnasium may set both): termination wins
    assert core.reward_to_go(r, flag, flag, nv, gamma).tolist() == term_rtg.tolist()

    # GAE, λ = 0.5: δ0 = 1 + .5·7 − 4 = 0.5, δ1 = 2 + .5·8 − 5 = 1, δ2 = 3 + .5·10 − 6 = 2 (trunc) or −3 (term)
    lam = 0.5
    adv_tr, _ = core.gae(r, v, nv, none, flag, gamma, lam)
    adv_te, _ = core.gae(r, v, nv, flag, none, gamma, lam)
    c = gamma * lam
    assert adv_tr.tolist() == [[0.5 + c * (1 + c * 2.0), 1 + c * 2.0, 2.0]]
    assert adv_te.tolist() == [[0.5 + c * (1 + c * -3.0), 1 + c * -3.0, -3.0]]
    assert core.gae(r, v, nv, flag, flag, gamma, lam)[0].tolist() == adv_te.tolist()


def test_done_cuts_the_trace_but_rollout_boundary_bootstraps():
    """A done at t = 0 stops the λ-trace and the reward-to-go; the last step (no flag) bootstraps."""
    r = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    nv = torch.tensor([[100.0, 0.0, 4.0]], dtype=torch.float64)
    trunc = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    none = torch.zeros_like(r)
    # step 0 truncated: 1 + 1·100; steps 1–2 are a fresh episode cut by the rollout: 1 + 1 + 4, 1 + 4
    assert core.reward_to_go(r, none, trunc, nv, 1.0).tolist() == [[101.0, 6.0, 5.0]]
    adv, _ = core.gae(r, none, nv, none, trunc, 1.0, 1.0)
    assert adv.tolist() == [[101.0, 6.0, 5.0]]


# --------------------------------------------------------------------------- total return (rung 1)
def test_total_return_analytic_with_autoreset():
    """Episode 1 (1, 2, 3) terminates; then a masked NEXT_STEP reset step; episode 2 (4, 5) is cut."""
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0, 4.0, 5.0]], dtype=torch.float64)
    term = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    none = torch.zeros_like(r)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    out = core.total_return(r, term, none, mask, 1.0)
    assert [out[0, t].item() for t in (0, 1, 2, 4, 5)] == [6.0, 6.0, 6.0, 9.0, 9.0]
    out = core.total_return(r, term, none, mask, 0.5)
    # episode 1: 1 + .5·2 + .25·3 = 2.75; episode 2: 4 + .5·5 = 6.5 (no extra γ for the masked step)
    assert [out[0, t].item() for t in (0, 1, 2, 4, 5)] == [2.75, 2.75, 2.75, 6.5, 6.5]
    # a rollout that resumes on a reset step (carried done from the previous iteration)
    out = core.total_return(r[:, 3:], none[:, 3:], none[:, 3:], mask[:, 3:], 0.5)
    assert out[0, 1:].tolist() == [6.5, 6.5]
    # a reward the env reports on a masked step is not part of any episode
    r2 = r.clone()
    r2[0, 3] = 100.0
    torch.testing.assert_close(core.total_return(r2, term, none, mask, 0.5)[mask.bool()], out.new_tensor(
        [2.75, 2.75, 2.75, 6.5, 6.5]))


@HYP
@given(B=st.integers(1, 3), T=st.integers(1, 14), seed=st.integers(0, 10_000),
       gamma=st.sampled_from([1.0, 0.99, 0.7, 0.0]))
def test_total_return_matches_segment_sums(B, T, seed, gamma):
    r, _, _, term, trunc, mask = random_episodes(B, T, seed, p_term=0.2, p_trunc=0.15, autoreset=True)
    out = core.total_return(r, term, trunc, mask, gamma)
    want = naive_total_return(L(r), L(term), L(trunc), L(mask), gamma)
    assert set(want) == {(b, t) for b in range(B) for t in range(T) if mask[b, t] > 0}
    for (b, t), R in want.items():
        assert out[b, t].item() == pytest.approx(R, rel=1e-10, abs=1e-10), (b, t)


def test_total_return_without_mask_is_segment_sum():
    r, _, _, term, trunc, _ = random_episodes(3, 20, seed=5, autoreset=False)
    ones = torch.ones_like(r)
    want = naive_total_return(L(r), L(term), L(trunc), L(ones), 0.9)
    out = core.total_return(r, term, trunc, None, 0.9)
    for (b, t), R in want.items():
        assert out[b, t].item() == pytest.approx(R, rel=1e-10, abs=1e-10)


# --------------------------------------------------------------------------- surrogates
def _policy_batch(seed=0, n=16, obs_dim=4, n_act=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g, dtype=dtype)
    actions = torch.randint(0, n_act, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    pi = torch.nn.Linear(obs_dim, n_act).to(dtype)
    return pi, obs, actions, adv


def _logp(pi, obs, actions):
    return Categorical(logits=pi(obs)).log_prob(actions)


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_importance_sampled_gradient_at_theta_old_is_vanilla(agg):
    pi, obs, actions, adv = _policy_batch(seed=1)
    params = list(pi.parameters())
    logp = _logp(pi, obs, actions).reshape(4, 4)  # [B, T] for the seq-mean case
    adv = adv.reshape(4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=logp.dtype)
    logp_old = logp.detach()
    is_loss = core.importance_sampled_loss(logp, logp_old, adv, mask, agg)
    pg_loss = core.vanilla_pg_loss(logp, adv, mask, agg)
    # values differ (E[ratio·A] vs E[logp·A]) but the gradients are the same at θ = θ_old
    for a, b in zip(_grads(is_loss, params), _grads(pg_loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert is_loss.item() == pytest.approx(-core.aggregate(adv, mask, agg).item())
    # logp_old is a constant even if the caller forgets to detach it (no gradient through the old policy)
    for loss in (core.importance_sampled_loss(logp, logp, adv, mask, agg),
                 core.clipped_loss(logp, logp, adv, 0.2, mask, agg)[0]):
        for a, b in zip(_grads(loss, params), _grads(pg_loss, params)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_vanilla_pg_loss_analytic_and_weights_detached():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    w = torch.tensor([[3.0, 5.0]], requires_grad=True)
    loss = core.vanilla_pg_loss(logp, w)
    assert loss.item() == pytest.approx(-(-3.0 - 10.0) / 2)
    gl, gw = torch.autograd.grad(loss, [logp, w], allow_unused=True)
    assert gl.tolist() == [[-1.5, -2.5]] and gw is None


@pytest.mark.parametrize("clip_coef", [float("inf"), 1e9])
def test_clip_with_infinite_coef_is_importance_sampling(clip_coef):
    pi, obs, actions, adv = _policy_batch(seed=2)
    params = list(pi.parameters())
    with torch.no_grad():  # θ_old ≠ θ: a perturbed copy of the policy
        old = torch.nn.Linear(4, 3).to(torch.float64)
        old.load_state_dict(pi.state_dict())
        for p in old.parameters():
            p.add_(0.5 * torch.randn_like(p))
        logp_old = _logp(old, obs, actions)
    logp = _logp(pi, obs, actions)
    ratio = torch.exp(logp - logp_old)
    assert (ratio - 1).abs().max() > 0.3  # really off-policy
    mask = (torch.arange(16) % 5 != 0).to(logp.dtype)
    clip, frac = core.clipped_loss(logp, logp_old, adv, clip_coef, mask)
    is_ = core.importance_sampled_loss(logp, logp_old, adv, mask)
    torch.testing.assert_close(clip, is_, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(clip, params), _grads(is_, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert frac.item() == 0.0


def test_clipped_loss_analytic():
    """Per sample min(r·A, clip(r)·A) with ε = 0.2; gradient flows only through the unclipped branch."""
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    logp_old = torch.zeros(5, dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    loss, frac = core.clipped_loss(logp, logp_old, adv, 0.2)
    per = [1.2 * 1.0, 1.5 * -1.0, 0.5 * 1.0, 0.8 * -1.0, 1.1 * 2.0]
    assert loss.item() == pytest.approx(-sum(per) / 5)
    assert frac.item() == pytest.approx(4 / 5)
    (g,) = torch.autograd.grad(loss, logp)
    # d/dlogp of −r·A/5 = −r·A/5 where unclipped is the min, 0 where the clipped constant is
    want = [0.0, 1.5 / 5, -0.5 / 5, 0.0, -1.1 * 2.0 / 5]
    torch.testing.assert_close(g, torch.tensor(want, dtype=torch.float64))


def test_kl_penalty_beta0_is_importance_sampling_and_beta_adds_mean_kl():
    pi, obs, actions, adv = _policy_batch(seed=3)
    params = list(pi.parameters())
    logp = _logp(pi, obs, actions)
    logp_old = logp.detach() + 0.3 * torch.randn_like(logp)
    kl = core.kl_k3(logp_old, logp)
    mask = (torch.arange(16) % 3 != 0).to(logp.dtype)
    pen = core.kl_penalty_loss(logp, logp_old, adv, kl, 0.0, mask)
    is_ = core.importance_sampled_loss(logp, logp_old, adv, mask)
    torch.testing.assert_close(pen, is_, rtol=0, atol=0)
    for a, b in zip(_grads(pen, params), _grads(is_, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    pen2 = core.kl_penalty_loss(logp, logp_old, adv, kl, 0.7, mask)
    torch.testing.assert_close(pen2, is_ + 0.7 * core.masked_mean(kl, mask))


def test_log_ratio_clamped_before_exp():
    logp = torch.tensor([0.0, 0.0])
    logp_old = torch.tensor([-1000.0, 0.0])
    adv = torch.tensor([1.0, 1.0])
    loss = core.importance_sampled_loss(logp, logp_old, adv)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-(math.exp(20.0) + 1) / 2, rel=1e-5)
    assert torch.isfinite(core.clipped_loss(logp, logp_old, adv, 0.2)[0])


def test_value_loss_analytic():
    v = torch.tensor([1.0, 3.0])
    ret = torch.tensor([2.0, 0.0])
    assert core.value_loss(v, ret).item() == pytest.approx(0.5 * (1 + 9) / 2)
    v_old = torch.tensor([0.0, 0.0])
    # clipped V = (0.5, 0.5): max((1−2)², (0.5−2)²) = 2.25; max(9, 0.25) = 9
    assert core.value_loss(v, ret, v_old, 0.5).item() == pytest.approx(0.5 * (2.25 + 9) / 2)


# --------------------------------------------------------------------------- KL estimators
def test_kl_estimators_monte_carlo_on_categorical():
    g = torch.Generator().manual_seed(0)
    p = Categorical(logits=torch.randn(6, generator=g, dtype=torch.float64))
    q = Categorical(logits=p.logits + 0.5 * torch.randn(6, generator=g, dtype=torch.float64))
    exact = core.exact_kl(p, q).item()
    torch.manual_seed(0)
    a = p.sample((400_000,))
    logp, logq = p.log_prob(a), q.log_prob(a)
    k1, k2, k3 = core.kl_k1(logp, logq), core.kl_k2(logp, logq), core.kl_k3(logp, logq)
    n = a.numel()
    for k in (k1, k3):  # unbiased: within 5 standard errors of the exact KL
        assert abs(k.mean().item() - exact) < 5 * k.std().item() / math.sqrt(n) + 1e-12
    # and the exact expectations over the support are exactly the KL
    logp_all, logq_all = p.logits, q.logits  # normalised log-probs
    probs = p.probs
    for est in (core.kl_k1, core.kl_k3):
        assert (probs * est(logp_all, logq_all)).sum().item() == pytest.approx(exact, rel=1e-12)
    assert (k3 >= 0).all() and (k2 >= 0).all() and (k1 < 0).any()
    # k2 is biased, but for nearby distributions it agrees to second order
    assert k2.mean().item() == pytest.approx(exact, rel=0.25)
    assert k3.std() < k1.std()  # the reason to prefer k3


def test_kl_k3_hand_values_and_ppo_approx_kl_form():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    logq = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    d = (logp - logq).tolist()
    assert core.kl_k1(logp, logq).tolist() == pytest.approx(d)
    assert core.kl_k2(logp, logq).tolist() == pytest.approx([0.5 * x * x for x in d])
    assert core.kl_k3(logp, logq).tolist() == pytest.approx([math.exp(-x) - 1 + x for x in d])
    # approx_kl of PPO: k3(logp_old, logp_new) = (ratio − 1) − log ratio
    ratio = torch.exp(logq - logp)
    torch.testing.assert_close(core.kl_k3(logp, logq), (ratio - 1) - (logq - logp))


def test_exact_kl_categorical_hand_formula():
    p = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
    got = core.exact_kl(Categorical(probs=p), Categorical(probs=q))
    want = [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p.tolist(), q.tolist())]
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_exact_kl_diagonal_normal_hand_formula():
    m1 = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64)
    s1 = torch.tensor([[1.0, 0.5, 2.0]], dtype=torch.float64)
    m2 = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    s2 = torch.tensor([[2.0, 0.5, 1.0]], dtype=torch.float64)
    got = core.exact_kl(Independent(Normal(m1, s1), 1), Independent(Normal(m2, s2), 1))
    want = sum(math.log(b2 / b1) + (b1 ** 2 + (a1 - a2) ** 2) / (2 * b2 ** 2) - 0.5
               for a1, b1, a2, b2 in zip(m1[0].tolist(), s1[0].tolist(), m2[0].tolist(), s2[0].tolist()))
    assert got.shape == (1,)  # summed over action dimensions
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_exact_kl_per_dim_is_the_mean_of_the_per_dimension_kls():
    """``per-dim`` is the joint KL / number of action dims: the mean over the dims of plain ``Normal`` KLs
    (sb3-contrib TRPO's quantity for Box actions); a Categorical has one dimension, so both agree."""
    m1, s1 = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6, dtype=torch.float64) + 0.5
    m2, s2 = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6, dtype=torch.float64) + 0.5
    p, q = Independent(Normal(m1, s1), 1), Independent(Normal(m2, s2), 1)
    per_dim = torch.distributions.kl_divergence(Normal(m1, s1), Normal(m2, s2))  # [4, 6]
    assert torch.allclose(core.exact_kl(p, q, "per-dim"), per_dim.mean(-1), rtol=1e-12)
    assert torch.allclose(core.exact_kl(p, q, "joint"), per_dim.sum(-1), rtol=1e-12)
    assert core.exact_kl(p, q, "per-dim").mean().item() == pytest.approx(per_dim.mean().item(), rel=1e-12)
    c1, c2 = Categorical(logits=torch.randn(3, 5)), Categorical(logits=torch.randn(3, 5))
    assert torch.equal(core.exact_kl(c1, c2, "per-dim"), core.exact_kl(c1, c2))
    with pytest.raises(ValueError, match="per-dim"):
        core.exact_kl(p, q, "mean")


# --------------------------------------------------------------------------- KL controllers
def test_ppo_beta_update():
    t = 0.01
    assert core.ppo_beta_update(1.0, 1.5 * t * 1.001, t) == 2.0
    assert core.ppo_beta_update(1.0, 10 * t, t) == 2.0
    assert core.ppo_beta_update(1.0, t / 1.5 * 0.999, t) == 0.5
    assert core.ppo_beta_update(1.0, 0.0, t) == 0.5
    for kl in (t / 1.5, t * 0.8, t, t * 1.2, 1.5 * t):  # the band, bounds included
        assert core.ppo_beta_update(1.0, kl, t) == 1.0
    assert core.ppo_beta_update(3.0, 1.0, t, factor=1.5, tolerance=1.3) == 4.5


def test_ziegler_beta_update():
    beta, target, n, horizon = 0.1, 6.0, 512, 10_000
    for kl in (0.0, 3.0, 5.0, 6.0, 6.6, 7.0, 7.2, 100.0):
        err = kl / target - 1.0
        err = -0.2 if err < -0.2 else (0.2 if err > 0.2 else err)
        want = beta * (1.0 + err * n / horizon)
        assert core.ziegler_beta_update(beta, kl, target, n, horizon) == pytest.approx(want, rel=1e-15)
    # the clip bites: far above target moves β by exactly +20 %·n/horizon
    assert core.ziegler_beta_update(1.0, 1e6, 1.0, 1, 1) == pytest.approx(1.2)
    assert core.ziegler_beta_update(1.0, 0.0, 1.0, 1, 1) == pytest.approx(0.8)
    assert core.ziegler_beta_update(1.0, 1.1, 1.0, 1, 1) == pytest.approx(1.1)
    assert core.ziegler_beta_update(2.0, 1.0, 1.0, 5, 7) == 2.0


# --------------------------------------------------------------------------- trust region
def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    calls = []

    def Avp(v):
        calls.append(1)
        return A @ v

    x = core.conjugate_gradient(Avp, b, iters=60, residual_tol=1e-24)
    assert (A @ x - b).norm().item() < 1e-9
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-6)
    assert len(calls) <= 60
    # iteration budget is respected, and a zero right-hand side returns 0 without calling Avp
    calls.clear()
    core.conjugate_gradient(Avp, b, iters=3)
    assert len(calls) == 3
    # the default tolerance stops once ‖r‖² ≤ 1e-10 (so ‖A x − b‖ ≈ 1e-5, not better: machine-independent bound)
    x = core.conjugate_gradient(Avp, b, iters=60)
    assert (A @ x - b).norm().item() < 2e-5
    calls.clear()
    assert core.conjugate_gradient(Avp, torch.zeros(20, dtype=torch.float64)).abs().max() == 0
    assert calls == []


def _tiny_net(flat, x, sizes=(3, 4, 3)):
    """A 3-4-3 tanh MLP from one flat parameter vector: logits [N, 3]."""
    i, h, o = sizes
    W1 = flat[: h * i].reshape(h, i)
    b1 = flat[h * i: h * i + h]
    k = h * i + h
    W2 = flat[k: k + o * h].reshape(o, h)
    b2 = flat[k + o * h: k + o * h + o]
    return torch.tanh(x @ W1.T + b1) @ W2.T + b2


N_PARAMS = 3 * 4 + 4 + 4 * 3 + 3


def _mean_kl_fn(x, logits_old):
    def f(flat):
        return core.exact_kl(Categorical(logits=logits_old), Categorical(logits=_tiny_net(flat, x))).mean()
    return f


@pytest.mark.parametrize("at_old", [True, False])
def test_fisher_vector_product_is_hessian_of_mean_kl_times_v(at_old):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    theta_old = torch.randn(N_PARAMS, generator=g, dtype=torch.float64)
    logits_old = _tiny_net(theta_old, x).detach()
    theta = theta_old.clone() if at_old else theta_old + 0.3 * torch.randn(N_PARAMS, generator=g, dtype=torch.float64)
    theta.requires_grad_(True)
    v = torch.randn(N_PARAMS, generator=g, dtype=torch.float64)
    kl_of = _mean_kl_fn(x, logits_old)
    H = torch.autograd.functional.hessian(kl_of, theta.detach())
    for damping in (0.0, 0.1):
        fvp = core.fisher_vector_product(lambda: kl_of(theta), [theta], v, damping)
        torch.testing.assert_close(fvp, H @ v + damping * v, rtol=1e-10, atol=1e-12)


def test_fisher_vector_product_fn_keeps_one_graph_and_gives_the_same_products_bit_for_bit():
    """The gym's TRPO keeps ∇KL's graph for all of CG's products: each product equals the recomputing
    fisher_vector_product exactly (float32, as the gym nets), repeatedly, and the Hessian times v."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x = torch.randn(32, 3)
    old = Categorical(logits=(net(x) + 0.3 * torch.randn(32, 4)).detach())
    params = list(net.parameters())
    kl = lambda: core.exact_kl(old, Categorical(logits=net(x))).mean()  # noqa: E731
    fvp = core.fisher_vector_product_fn(kl, params, damping=0.1)
    n = sum(p.numel() for p in params)
    for seed in range(3):
        v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(fvp(v), core.fisher_vector_product(kl, params, v, 0.1))
        assert torch.equal(fvp(v), fvp(v))  # the kept graph is not consumed by a product
    flat = torch.nn.utils.parameters_to_vector(params).detach().double()

    def kl_of(theta):
        w1, b1, w2, b2 = torch.split(theta, [24, 8, 32, 4])
        h = torch.tanh(x.double() @ w1.view(8, 3).T + b1)
        return core.exact_kl(Categorical(logits=old.logits.double()), Categorical(logits=h @ w2.view(4, 8).T + b2)).mean()

    H = torch.autograd.functional.hessian(kl_of, flat)
    v = torch.randn(n)
    torch.testing.assert_close(fvp(v).double(), H @ v.double() + 0.1 * v.double(), rtol=1e-4, atol=1e-6)


def test_fisher_vector_product_with_several_parameter_tensors():
    """flat_grad concatenates parameters in order: an nn.Linear's (weight, bias) match the flat layout."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).to(torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    logits_old = (lin(x) + 0.2 * torch.randn(6, 4, dtype=torch.float64)).detach()
    v = torch.randn(16, dtype=torch.float64)

    def kl_of(flat):
        logits = x @ flat[:12].reshape(4, 3).T + flat[12:]
        return core.exact_kl(Categorical(logits=logits_old), Categorical(logits=logits)).mean()

    flat = torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()])
    H = torch.autograd.functional.hessian(kl_of, flat)
    fvp = core.fisher_vector_product(
        lambda: core.exact_kl(Categorical(logits=logits_old), Categorical(logits=lin(x))).mean(),
        list(lin.parameters()), v, damping=0.1)
    torch.testing.assert_close(fvp, H @ v + 0.1 * v, rtol=1e-10, atol=1e-12)


def test_kl_hessian_at_theta_old_is_fisher_information():
    """At θ = θ_old, ∇²_θ mean_s KL(π_old‖π_θ) = mean_s Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    theta = torch.randn(N_PARAMS, generator=g, dtype=torch.float64)
    H = torch.autograd.functional.hessian(_mean_kl_fn(x, _tiny_net(theta, x).detach()), theta)
    # explicit Fisher: Jacobian of all log-probs [N, A] w.r.t. θ, outer products weighted by π
    J = torch.autograd.functional.jacobian(lambda th: torch.log_softmax(_tiny_net(th, x), -1), theta)  # [N, A, P]
    probs = torch.softmax(_tiny_net(theta, x), -1)
    F = torch.zeros(N_PARAMS, N_PARAMS, dtype=torch.float64)
    for s in range(x.shape[0]):
        for a in range(probs.shape[1]):
            F += probs[s, a] * torch.outer(J[s, a], J[s, a])
    F /= x.shape[0]
    torch.testing.assert_close(H, F, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(F).min() > -1e-12  # PSD, so CG on F + damping·I is well posed


class _Scripted:
    """evaluate(frac) returning scripted (improvement, kl) pairs, recording the fractions asked for."""

    def __init__(self, results):
        self.results, self.fracs = list(results), []

    def __call__(self, frac):
        self.fracs.append(frac)
        return self.results[len(self.fracs) - 1]


def test_line_search_accepts_first_fraction_meeting_both_conditions():
    ev = _Scripted([(-1.0, 0.001), (0.5, 0.05), (0.3, 0.01), (0.9, 0.001)])
    res = core.backtracking_line_search(ev, max_kl=0.01, backtrack_coef=0.8, max_backtracks=10)
    assert res.accepted and res.backtracks == 2
    assert res.step_fraction == pytest.approx(0.64) and ev.fracs == pytest.approx([1.0, 0.8, 0.64])
    assert (res.improvement, res.kl) == (0.3, 0.01)  # KL == δ is allowed; the later better step is not tried
    # the full step when it is good: no backtrack
    res = core.backtracking_line_search(_Scripted([(0.1, 0.0)]), max_kl=0.01)
    assert res.accepted and res.backtracks == 0 and res.step_fraction == 1.0


def test_line_search_rejects_when_nothing_qualifies():
    bad = [(0.0, 0.001), (1.0, 0.0101), (float("nan"), 0.0), (1.0, float("nan")), (-0.1, 0.0), (1.0, float("inf"))]
    ev = _Scripted(bad)
    res = core.backtracking_line_search(ev, max_kl=0.01, backtrack_coef=0.5, max_backtracks=5)
    assert not res.accepted and res.step_fraction == 0.0 and res.backtracks == 5
    assert ev.fracs == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    ev = _Scripted([(-1.0, 0.0), (1.0, 0.0)])
    res = core.backtracking_line_search(ev, max_kl=0.01, max_backtracks=0)  # NPG-like: one try only
    assert not res.accepted and ev.fracs == [1.0]


@HYP
@given(results=st.lists(st.tuples(st.one_of(st.floats(-1, 1), st.just(float("nan"))),
                                   st.one_of(st.floats(0, 0.03), st.just(float("nan")))), min_size=1, max_size=8),
       max_kl=st.floats(0.001, 0.02))
def test_line_search_never_accepts_kl_above_max(results, max_kl):
    ev = _Scripted(results)
    res = core.backtracking_line_search(ev, max_kl=max_kl, backtrack_coef=0.8, max_backtracks=len(results) - 1)
    ok = [i for i, (imp, kl) in enumerate(results) if imp > 0 and kl <= max_kl]
    assert res.accepted == bool(ok)
    if ok:
        assert res.backtracks == ok[0] and res.kl <= max_kl and res.improvement > 0
        assert res.step_fraction == pytest.approx(0.8 ** ok[0]) and len(ev.fracs) == ok[0] + 1
    else:
        assert len(ev.fracs) == len(results) and res.step_fraction == 0.0


# --------------------------------------------------------------------------- masked statistics
@HYP
@given(n=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_masked_mean_var_whiten_match_naive(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(n, generator=g, dtype=torch.float64) + 1.0
    mask = (torch.rand(n, generator=g) < 0.6).to(torch.float64)
    vals = [xi for xi, m in zip(x.tolist(), mask.tolist()) if m]
    k = len(vals)
    mean = statistics.fmean(vals) if k else 0.0
    assert core.masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-12)
    var_u = statistics.variance(vals) if k >= 2 else 0.0
    var_b = statistics.pvariance(vals) if k >= 1 else 0.0
    assert core.masked_var(x, mask).item() == pytest.approx(var_u, rel=1e-10, abs=1e-12)
    assert core.masked_var(x, mask, unbiased=False).item() == pytest.approx(var_b, rel=1e-10, abs=1e-12)
    for shift in (True, False):
        w = core.masked_whiten(x, mask, shift_mean=shift)
        assert torch.isfinite(w).all()
        for i in range(n):
            if not mask[i]:
                assert w[i].item() == x[i].item()  # masked-out entries untouched
            elif k >= 2:
                z = (x[i].item() - mean) / math.sqrt(var_u + 1e-8)
                assert w[i].item() == pytest.approx(z if shift else z + mean, rel=1e-9, abs=1e-9)
            else:
                assert w[i].item() == pytest.approx(x[i].item() - mean if shift else x[i].item())


def test_masked_whiten_properties_and_nan_guards():
    g = torch.Generator().manual_seed(0)
    x = 5.0 + 2.0 * torch.randn(40, generator=g, dtype=torch.float64)
    mask = (torch.arange(40) % 4 != 0).to(torch.float64)
    m = mask.bool()
    w = core.masked_whiten(x, mask)
    assert abs(w[m].mean().item()) < 1e-12 and w[m].std().item() == pytest.approx(1.0, rel=1e-6)
    s = core.masked_whiten(x, mask, shift_mean=False)  # rewards: keep the mean (and the sign)
    assert s[m].mean().item() == pytest.approx(x[m].mean().item(), rel=1e-12)
    assert s[m].std().item() == pytest.approx(1.0, rel=1e-6)
    for valid in (0, 1, 2):  # tiny batches
        mk = torch.zeros(40, dtype=torch.float64)
        mk[:valid] = 1
        for shift in (True, False):
            assert torch.isfinite(core.masked_whiten(x, mk, shift_mean=shift)).all()
    const = torch.full((10,), 3.0, dtype=torch.float64)  # zero variance
    assert core.masked_whiten(const).tolist() == [0.0] * 10
    assert core.masked_whiten(const, shift_mean=False).tolist() == pytest.approx([3.0] * 10)
    two_equal = torch.tensor([2.0, 2.0, 99.0])
    assert torch.isfinite(core.masked_whiten(two_equal, torch.tensor([1.0, 1.0, 0.0]))).all()
    assert core.masked_mean(x, torch.zeros_like(x)).item() == 0.0  # empty mask: 0, not NaN
    assert core.masked_var(x, torch.zeros_like(x)).item() == 0.0


def test_masked_mean_along_dim_and_bool_mask():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert core.masked_mean(x, mask, dim=-1).tolist() == [1.5, 0.0]
    assert core.masked_mean(x, mask.bool()).item() == 1.5
    assert core.masked_sum(x, mask, dim=0).tolist() == [1.0, 2.0, 0.0]


def test_aggregate_token_mean_vs_seq_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 77.0, 77.0, 77.0], [55.0, 55.0, 55.0, 55.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert core.aggregate(x, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4 + 10) / 5)  # 4
    assert core.aggregate(x, mask, "seq-mean").item() == pytest.approx((2.5 + 10) / 2)  # empty row ignored
    flat = torch.tensor([[1.0], [2.0], [6.0]])  # gym path, T = 1: both agree
    ones = torch.ones_like(flat)
    assert core.aggregate(flat, ones, "token-mean") == core.aggregate(flat, ones, "seq-mean") == 3.0
    with pytest.raises(ValueError):
        core.aggregate(x, mask, "sum")


# --------------------------------------------------------------------------- diagnostics
def test_effective_sample_size():
    n = 50
    assert core.effective_sample_size(torch.full((n,), -3.7)).item() == pytest.approx(1.0, rel=1e-6)
    lw = torch.zeros(n)
    lw[7] = 60.0  # one weight dominates (and exp(60) would overflow float32 in a naive computation)
    assert core.effective_sample_size(lw).item() == pytest.approx(1.0 / n, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(4, 25, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 25, generator=g) < 0.7).to(torch.float64)
    w = [math.exp(a) for a, m in zip(lw.reshape(-1).tolist(), mask.reshape(-1).tolist()) if m]
    want = sum(w) ** 2 / (len(w) * sum(x * x for x in w))
    assert core.effective_sample_size(lw, mask).item() == pytest.approx(want, rel=1e-10)
    # masked-out weights are ignored, however large
    lw2 = lw.masked_fill(~mask.bool(), 500.0)
    assert core.effective_sample_size(lw2, mask).item() == pytest.approx(want, rel=1e-10)


def test_explained_variance():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(100, generator=g, dtype=torch.float64)
    assert core.explained_variance(y.clone(), y).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(y, y.mean().item()), y).item() == pytest.approx(0.0, abs=1e-12)
    pred = y + 0.5 * torch.randn(100, generator=g, dtype=torch.float64)
    assert core.explained_variance(pred, y).item() == pytest.approx(1 - (y - pred).var().item() / y.var().item())
    assert math.isnan(core.explained_variance(y, torch.ones_like(y)).item())  # nothing to explain
    v = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    noise = (v + 0.1) - v  # equal targets up to rounding (returns = advantages + values): was ~ −1e31, now NaN
    assert noise.var() > 0 and math.isnan(core.explained_variance(v, noise).item())
    mask = torch.ones_like(y)
    mask[:50] = 0
    bad = y.clone()
    bad[:50] = 1e6  # garbage on masked entries does not count
    assert core.explained_variance(bad, y, mask).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- objective
def _batch(B=3, T=15, seed=0, critic=True):
    r, v, nv, term, trunc, mask = random_episodes(B, T, seed, p_term=0.15, p_trunc=0.1, autoreset=True)
    return Batch(obs=None, actions=torch.zeros(B, T, dtype=torch.long), logp_old=torch.zeros(B, T, dtype=r.dtype),
                 rewards=r, terminated=term, truncated=trunc, mask=mask,
                 values=v if critic else None, next_values=nv if critic else None)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_estimate_advantages_return_and_baseline(gamma):
    b = _batch(seed=11)
    out = objective.estimate_advantages(b, "return", gamma, 0.95)
    want = naive_total_return(L(b.rewards), L(b.terminated), L(b.truncated), L(b.mask), gamma)
    for (i, t), R in want.items():
        assert out.adv[i, t].item() == pytest.approx(R, rel=1e-10, abs=1e-10)
    want_ret = naive_reward_to_go(L(b.rewards), L(b.terminated), L(b.truncated), L(b.next_values), gamma)
    torch.testing.assert_close(out.ret, torch.tensor(want_ret, dtype=torch.float64))
    base = objective.estimate_advantages(b, "return-baseline", gamma, 0.95)
    step_mean = statistics.fmean(want.values())  # b = mean of R(τ) over the real steps
    for (i, t), R in want.items():
        assert base.adv[i, t].item() == pytest.approx(R - step_mean, rel=1e-10, abs=1e-10)
    assert abs(core.masked_mean(base.adv, b.mask).item()) < 1e-12
    torch.testing.assert_close(base.ret, out.ret)
    assert b.adv is None  # the input batch is not mutated


def test_estimate_advantages_gae_and_errors():
    b = _batch(seed=12)
    out = objective.estimate_advantages(b, "gae", 0.99, 0.9)
    want = naive_gae(L(b.rewards), L(b.values), L(b.next_values), L(b.terminated), L(b.truncated), 0.99, 0.9)
    torch.testing.assert_close(out.adv, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(out.ret, out.adv + b.values)
    with pytest.raises(ValueError, match="critic"):
        objective.estimate_advantages(_batch(seed=12, critic=False), "gae", 0.99, 0.9)
    with pytest.raises(ValueError):
        objective.estimate_advantages(b, "td", 0.99, 0.9)
    # without a critic, returns need no next_values: ret is the unbootstrapped reward-to-go
    nb = _batch(seed=12, critic=False)
    out = objective.estimate_advantages(nb, "return", 0.9, 0.95)
    torch.testing.assert_close(out.ret, core.reward_to_go(nb.rewards, nb.terminated, nb.truncated, None, 0.9))


def test_normalize_advantages_modes():
    g = torch.Generator().manual_seed(0)
    adv = 4.0 + 3.0 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 8, generator=g) < 0.7).to(torch.float64)
    m = mask.bool()
    assert objective.normalize_advantages(adv, mask, "off") is adv
    w = objective.normalize_advantages(adv, mask, "whiten")
    assert abs(w[m].mean().item()) < 1e-12 and w[m].std().item() == pytest.approx(1.0, rel=1e-6)
    # "scale" divides by the std and keeps the sign: rung 1's all-positive R(τ) stays all positive
    s = objective.normalize_advantages(adv, mask, "scale")
    torch.testing.assert_close(s, adv / adv[m].std())
    assert s[m].std().item() == pytest.approx(1.0, rel=1e-6)
    pos = objective.normalize_advantages(adv.abs() + 100.0, mask, "scale")
    assert (pos > 0).all()
    assert torch.equal(w[~m], adv[~m])
    with pytest.raises(ValueError):
        objective.normalize_advantages(adv, mask, "std")


@pytest.mark.parametrize("surrogate", objective.SURROGATES)
def test_surrogate_loss_ratio_is_one_at_theta_old(surrogate):
    pi, obs, actions, adv = _policy_batch(seed=5)
    logp = _logp(pi, obs, actions).reshape(4, 4)
    adv = adv.reshape(4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=logp.dtype)
    loss, stats = objective.surrogate_loss(surrogate, logp, logp.detach(), adv, mask, clip_coef=0.2, beta=0.5)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0
    assert ("clip_fraction" in stats) == (surrogate == "clip")
    if surrogate == "clip":
        assert stats["clip_fraction"].item() == 0.0
    assert all(not s.requires_grad for s in stats.values())
    # every surrogate has the vanilla gradient at θ = θ_old (the penalty's k3 has zero gradient there)
    params = list(pi.parameters())
    vanilla = core.vanilla_pg_loss(logp, adv, mask)
    for a, b in zip(_grads(loss, params), _grads(vanilla, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_surrogate_loss_dispatches_to_core():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64)
    logp_old = logp + 0.4 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 5, generator=g) < 0.8).to(torch.float64)
    for agg in ("token-mean", "seq-mean"):
        got = {s: objective.surrogate_loss(s, logp, logp_old, adv, mask, clip_coef=0.1, beta=0.3, agg=agg)
               for s in objective.SURROGATES}
        torch.testing.assert_close(got["vanilla"][0], core.vanilla_pg_loss(logp, adv, mask, agg))
        torch.testing.assert_close(got["is"][0], core.importance_sampled_loss(logp, logp_old, adv, mask, agg))
        k3 = core.kl_k3(logp_old, logp)  # default penalty: k3 estimate of KL(π_old‖π_θ)
        torch.testing.assert_close(got["kl-penalty"][0], core.kl_penalty_loss(logp, logp_old, adv, k3, 0.3, mask, agg))
        exact = torch.rand(3, 5, generator=g, dtype=torch.float64)
        torch.testing.assert_close(
            objective.surrogate_loss("kl-penalty", logp, logp_old, adv, mask, beta=0.3, kl=exact, agg=agg)[0],
            core.kl_penalty_loss(logp, logp_old, adv, exact, 0.3, mask, agg))
        clip, frac = core.clipped_loss(logp, logp_old, adv, 0.1, mask, agg)
        torch.testing.assert_close(got["clip"][0], clip)
        torch.testing.assert_close(got["clip"][1]["clip_fraction"], frac)
        stats = got["is"][1]
        ratio = torch.exp(logp - logp_old)
        assert stats["ratio_mean"].item() == pytest.approx(ratio[mask.bool()].mean().item())
        assert stats["ratio_max"].item() == pytest.approx(ratio[mask.bool()].max().item())
        assert stats["approx_kl"].item() == pytest.approx(core.masked_mean(k3, mask).item())
    with pytest.raises(ValueError):
        objective.surrogate_loss("trpo", logp, logp_old, adv, mask)


def test_band_leaves_grid_points_before_every_curve_nan_without_a_warning():
    """The ladder's figure: grid points before any seed's first logged step are NaN (not drawn), and no
    numpy 'All-NaN slice' warning reaches the user's stderr."""
    import warnings

    import numpy as np

    from proxrl.run.plot import band

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        med, lo, hi = band([(np.array([5.0, 10.0]), np.array([1.0, 2.0])),
                            (np.array([7.0, 10.0]), np.array([3.0, 4.0]))], np.array([0.0, 5.0, 8.0, 10.0]))
        assert band([(np.zeros(0), np.zeros(0))], np.array([0.0])) is None
    assert np.isnan([med[0], lo[0], hi[0]]).all()
    assert (lo[1], med[1], hi[1]) == (1.0, 1.0, 1.0)  # one seed has started: its value
    assert lo[3] == 2.0 and hi[3] == 4.0 and med[3] == 3.0
