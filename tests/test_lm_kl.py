"""KL to the reference: placement (reward | loss) × estimator (k1 | k2 | k3), DETAILS 19.

On a small categorical policy π_θ = softmax(θ) over 5 outcomes and a fixed π_ref, the expected gradient over
on-policy samples x ~ π_θ is computed exactly (every outcome enumerated, weighted by its probability, the
sampling distribution itself not differentiated — what a sampled batch estimates) through the functions the
trainer calls, and compared with the autograd gradients of the exact KL(π_θ‖π_ref) and KL(π_ref‖π_θ):

| placement | k1 | k2 | k3 |
|---|---|---|---|
| loss (+β·k, gradient through log π_θ) | 0 | ∇KL(π‖π_ref) | ∇KL(π_ref‖π) |
| reward (−β·k, score-function gradient) | ∇KL(π‖π_ref) | biased | biased |
"""

import pytest
import torch

from proxrl import core

N = 5


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N, dtype=torch.float64, generator=g).requires_grad_(True)
    logp_ref = torch.log_softmax(torch.randn(N, dtype=torch.float64, generator=g), 0)
    return theta, logp_ref


def exact_kls(theta, logp_ref):
    logp = torch.log_softmax(theta, 0)
    reverse = core.categorical_kl(logp, logp_ref)  # KL(π‖π_ref)
    forward = core.categorical_kl(logp_ref, logp)  # KL(π_ref‖π)
    g_rev, = torch.autograd.grad(reverse, theta, retain_graph=True)
    g_fwd, = torch.autograd.grad(forward, theta)
    return g_rev, g_fwd


def expected_loss_gradient(theta, logp_ref, estimator):
    """E_{x~π_θ}[∇ kl_ref_loss(x)]: the KL term in the loss, one sampled token x."""
    p = torch.softmax(theta, 0).detach()
    total = torch.zeros_like(theta)
    for x in range(N):
        logp = torch.log_softmax(theta, 0)[x].reshape(1, 1)
        loss = core.kl_ref_loss(logp, logp_ref[x].reshape(1, 1), estimator)
        g, = torch.autograd.grad(loss, theta)
        total += p[x] * g
    return total


def expected_reward_gradient(theta, logp_ref, estimator):
    """E_{x~π_θ}[∇ vanilla_pg_loss] with the per-token reward −k(x) (β = 1): the score-function gradient
    of the KL in the reward (the reward is a constant of the update: no gradient through k)."""
    p = torch.softmax(theta, 0).detach()
    total = torch.zeros_like(theta)
    for x in range(N):
        logp = torch.log_softmax(theta, 0)[x].reshape(1, 1)
        k = core.kl_estimate(estimator, logp.detach(), logp_ref[x].reshape(1, 1))
        reward = -k
        loss = core.vanilla_pg_loss(logp, reward)
        g, = torch.autograd.grad(loss, theta)
        total += p[x] * g
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_in_the_loss_exact_expectations(seed):
    theta, logp_ref = setup(seed)
    g_rev, g_fwd = exact_kls(theta, logp_ref)
    assert (g_rev - g_fwd).abs().max() > 1e-2  # the two KLs have different gradients here
    torch.testing.assert_close(expected_loss_gradient(theta, logp_ref, "k1"), torch.zeros(N, dtype=torch.float64),
                               atol=1e-14, rtol=0)  # k1 in the loss: the gradient of nothing
    torch.testing.assert_close(expected_loss_gradient(theta, logp_ref, "k2"), g_rev, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(expected_loss_gradient(theta, logp_ref, "k3"), g_fwd, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_in_the_reward_exact_expectations(seed):
    theta, logp_ref = setup(seed)
    g_rev, g_fwd = exact_kls(theta, logp_ref)
    # minimising the policy loss with reward −k1 follows ∇KL(π‖π_ref): the reverse KL, unbiased
    torch.testing.assert_close(expected_reward_gradient(theta, logp_ref, "k1"), g_rev, atol=1e-13, rtol=1e-12)
    for est in ("k2", "k3"):  # biased: neither KL's gradient
        got = expected_reward_gradient(theta, logp_ref, est)
        assert (got - g_rev).abs().max() > 1e-3 and (got - g_fwd).abs().max() > 1e-3, est


def test_estimator_values_on_policy():
    """The values (not the gradients): E_π[k1] = E_π[k3] = KL(π‖π_ref); E_π[k2] ≠ KL in general; k3 ≥ 0."""
    theta, logp_ref = setup(0)
    logp = torch.log_softmax(theta, 0).detach()
    p = logp.exp()
    kl = float(core.categorical_kl(logp, logp_ref))
    for est in ("k1", "k3"):
        assert float((p * core.kl_estimate(est, logp, logp_ref)).sum()) == pytest.approx(kl, rel=1e-12)
    assert abs(float((p * core.kl_estimate("k2", logp, logp_ref)).sum()) - kl) > 1e-3
    assert (core.kl_k3(logp, logp_ref) >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        core.kl_estimate("k4", logp, logp_ref)


def test_kl_ref_loss_aggregates_like_the_policy_loss():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]], dtype=torch.float64))
    logp_ref = torch.log(torch.tensor([[0.4, 0.4, 0.8], [0.5, 0.5, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    k3 = core.kl_k3(logp, logp_ref)
    assert float(core.kl_ref_loss(logp, logp_ref, "k3", mask)) == pytest.approx(float((k3 * mask).sum() / 5))
    assert float(core.kl_ref_loss(logp, logp_ref, "k3", mask, "constant", 4)) == pytest.approx(
        float((k3 * mask).sum() / (2 * 4)))


# --------------------------------------------------------------------------- through the trainer
pytest.importorskip("transformers")
pytest.importorskip("peft")

from proxrl.lm.config import RLConfig  # noqa: E402
from proxrl.lm.ppo_trainer import PPOTrainer  # noqa: E402
from proxrl.lm.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def mean_byte(prompts, responses):
    return [sum(r.encode()) / max(len(r.encode()), 1) / 255 for r in responses]


def trainer(tiny, **kw):
    args = dict(policy=tiny, reward="unused:fn", prompts="unused", out="unused", batch_size=8, micro_batch_size=4,
                response_length=6, dtype="float64", finetune="full", missing_eos_penalty=None, algo="pg",
                kl_coef=0.5, adaptive_kl=False)
    args.update(kw)
    return PPOTrainer(RLConfig(**args), reward=mean_byte)


def test_estimator_in_the_reward_through_the_trainer(tiny):
    tr = trainer(tiny, kl_estimator="k3")
    ro = tr.generate(["ab", "xyz"] * 4)
    scores = tr.score(ro)
    batch, _ = tr.make_batch(ro, scores)
    m = batch.mask
    want = -0.5 * core.kl_k3(batch.logp_old, batch.logp_ref) * m
    last = (m.sum(-1) - 1).long()
    want[torch.arange(8), last] += scores
    torch.testing.assert_close(batch.rewards, want, atol=1e-12, rtol=0)


def test_kl_in_the_loss_through_the_trainer(tiny):
    """--kl-in loss: no KL in the rewards; the loss gradient is the pg gradient + β·∇mean(k3)."""
    tr = trainer(tiny, kl_in="loss", kl_estimator="k3", update_epochs=1, num_minibatches=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the policy off the reference: at π = π_ref the KL term and its gradient are 0
        for p in tr.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    ro = tr.generate(["ab", "xyz"] * 4)
    scores = tr.score(ro)
    b, _, ro2 = tr.rollouts.make_batch(ro, scores, 0.0, 1)
    last = (b.mask.sum(-1) - 1).long()
    assert torch.equal(b.rewards[torch.arange(8), last], scores) and float(b.rewards.abs().sum()) == pytest.approx(
        float(scores.abs().sum()))
    params = [p for p in tr.policy.parameters() if p.requires_grad]
    tr.optimizer.zero_grad(set_to_none=True)
    st = tr.accumulate(b, ro.ids, ro.mask, torch.arange(8))
    got = [p.grad.clone() if p.grad is not None else None for p in params]
    logp, _, _ = tr.policy(ro.ids, ro.mask, b.shape[1], tr.cfg.temperature, values=False, entropy=False)
    k3 = core.masked_mean(core.kl_k3(logp, b.logp_ref), b.mask)  # the loss term, by hand
    loss = core.vanilla_pg_loss(logp, b.adv, b.mask) + 0.5 * k3
    want = torch.autograd.grad(loss, params, allow_unused=True)
    for g1, g2 in zip(got, want):
        if g2 is None:
            continue
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-9)
    assert st["kl_ref_loss"] == pytest.approx(float(k3.detach()), abs=1e-12) and float(k3.detach()) > 0
