"""Top-k / top-p sampling reported as such: the sampler draws from the truncated, renormalised softmax and
the policy's log-probs are of that same distribution, so the first ratio is exactly 1 and the k1 KL of the
sampled tokens is the truncated policy's; an exact-KL rung with truncation is refused."""

import pytest
import torch

from proxrl import core

pytest.importorskip("transformers")

from proxrl.lm.config import RLConfig  # noqa: E402
from proxrl.lm.ppo_trainer import PPOTrainer  # noqa: E402
from proxrl.lm.sampling import InverseCDFSampler  # noqa: E402
from proxrl.lm.tiny import make_tiny  # noqa: E402


def naive_truncate(row: list[float], k: int, p: float) -> set[int]:
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if k:
        kth = row[order[k - 1]]
        order = [i for i in order if row[i] >= kth]
    z = sum(torch.tensor([row[i] for i in order]).exp().tolist())
    kept, mass = [], 0.0
    for i in order:
        if mass >= p:
            break
        kept.append(i)
        mass += float(torch.tensor(row[i]).exp()) / z
    return set(kept)


@pytest.mark.parametrize("k,p", [(3, 1.0), (0, 0.6), (4, 0.7), (0, 1.0), (1, 1.0), (0, 1e-6)])
def test_truncate_logits_matches_a_naive_loop(k, p):
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(k + int(p * 10)), dtype=torch.float64)
    out = core.truncate_logits(logits, k, p)
    for b in range(5):
        kept = {i for i in range(11) if out[b, i] > -float("inf")}
        assert kept == naive_truncate(logits[b].tolist(), k, p)
        assert torch.equal(out[b, sorted(kept)], logits[b, sorted(kept)])
    keep = torch.tensor([int(logits[b].argmin()) for b in range(5)])
    forced = core.truncate_logits(logits, k, p, keep=keep)
    assert all(forced[b, keep[b]] == logits[b, keep[b]] for b in range(5))


def test_sampler_draws_exactly_from_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    want = torch.softmax(core.truncate_logits(logits / 0.8, 3, 0.95), -1)[0]
    g = torch.Generator().manual_seed(0)
    s = InverseCDFSampler(0.8, g, top_k=3, top_p=0.95)
    n = 40_000
    draws = torch.cat([s.draw(logits.expand(1000, -1)) for _ in range(n // 1000)])
    freq = torch.bincount(draws, minlength=6).double() / n
    assert set(draws.unique().tolist()) <= {0, 1, 2}
    assert torch.allclose(freq, want.double(), atol=4 * (0.25 / n) ** 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def letters(prompts, responses):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.5)])
def test_truncated_rollouts_have_exact_ratios(tiny, k, p):
    tr = PPOTrainer(RLConfig(algo="ppo-clip", policy=tiny, reward="unused:fn", prompts="unused", out="unused",
                             batch_size=8, micro_batch_size=4, response_length=8, dtype="float64", finetune="full",
                             missing_eos_penalty=None, top_k=k, top_p=p, temperature=1.0), reward=letters)
    rollout = tr.generate(["ab", "hello", "xyz", "q"] * 2)
    # every sampled token lies in the truncated support recomputed by a full forward (no forced keep)
    ids, mask, R = rollout.ids, rollout.mask, rollout.response_ids.shape[1]
    from proxrl.lm.policy import forward, log_probs_all

    logits, _ = forward(tr.policy.lm, ids, mask, R + 1)
    strict = log_probs_all(logits[:, :-1], 1.0, k, p).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    m = rollout.response_mask.bool()
    assert torch.isfinite(strict[m]).all()
    support = torch.isfinite(log_probs_all(logits[:, :-1], 1.0, k, p)).sum(-1)[m]
    assert support.max() < logits.shape[-1]  # truncation really happened
    batch, stats = tr.make_batch(rollout, tr.score(rollout))
    torch.testing.assert_close(batch.logp_old[m], strict[m])  # the batch's log-probs ARE the truncated ones
    with torch.no_grad():  # the training forward scores the same distribution: the first ratio is exactly 1
        lp_now, _, ent = tr.policy(ids, mask, R, 1.0, values=False, entropy=True)
    assert torch.equal(lp_now[m], batch.logp_old[m]) and torch.isfinite(ent[m]).all()
    assert ent[m].max() <= torch.log(support.double()).max() + 1e-9  # entropy of the truncated distribution
    metrics = tr.step(rollout, tr.score(rollout))
    assert metrics["clip_fraction"] >= 0 and torch.isfinite(torch.tensor(metrics["policy_loss"]))
    assert stats["kl_ref_k1"] > 0  # truncation moves mass onto fewer tokens: KL(π_trunc‖π_ref) > 0


@pytest.mark.parametrize("algo", ["ppo-kl", "trpo"])
def test_truncation_with_an_exact_kl_rung_is_refused(tiny, algo):
    from proxrl.errors import ConfigError

    with pytest.raises(ConfigError, match="top_k: top-k/top-p sampling with an exact KL"):
        RLConfig(algo=algo, policy=tiny, reward="m:f", prompts="p", top_k=10).validate(need_prompts=False)
    for bad, field in ((dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ConfigError, match=field):
            RLConfig(algo="grpo", policy=tiny, reward="m:f", prompts="p", **bad).validate(need_prompts=False)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradient_and_recomputes(tiny, finetune):
    """--gradient-checkpointing: the same loss and gradient to float rounding, and the blocks really run a
    second time in backward (their activations were not kept)."""
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.policy import build_policy

    grads, calls = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        pol = build_policy(tiny, PPOConfig(policy=tiny, dtype="float64", finetune=finetune, gradient_checkpointing=ckpt))
        from proxrl.lm.loading import transformer_blocks

        _, blocks = transformer_blocks(pol.lm)
        n = [0]
        next(iter(blocks[0].children())).register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))  # inside the block
        ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        logp, v, _ = pol(ids, mask, 5, 0.7, values=True, entropy=False)
        (logp.sum() + v.sum()).backward()
        grads[ckpt] = {k: p.grad.clone() for k, p in pol.named_parameters() if p.grad is not None}
        calls[ckpt] = n[0]
        with torch.no_grad():
            pol(ids, mask, 5, 0.7, values=False, entropy=False)
        calls[(ckpt, "no_grad")] = n[0] - calls[ckpt]
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-10, atol=1e-12)
    assert calls[False] == 1 and calls[True] == 2  # recomputed once in backward
    assert calls[(True, "no_grad")] == 1  # no-grad forwards are not wrapped in a checkpoint


@pytest.mark.parametrize("k,p,T", [(0, 1.0, 1.0), (0, 1.0, 0.7), (5, 0.9, 0.8)])
@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_chunked_log_probs_equal_the_whole_tensor_ones(k, p, T, entropy_grad, path, monkeypatch):
    """response_logp computes the log-softmax a chunk of positions at a time (checkpointed under autograd),
    or, for logits of at most DIRECT_LOGP_ELEMENTS, in one pass: either way the same log-probs, entropies
    and gradients as the whole-tensor computation, bit for bit."""
    import proxrl.lm.policy as policy_mod
    from proxrl.lm.policy import log_probs_all, response_logp

    monkeypatch.setattr(policy_mod, "DIRECT_LOGP_ELEMENTS", 0 if path == "chunked" else 1 << 22)
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real_checkpoint(*a, **kw))

    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 37, 50, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 50, (3, 37), generator=g)
    w = torch.randn(3, 37, generator=g, dtype=torch.float64)
    out = {}
    for how in ("whole", "chunked"):
        logits = base.clone().requires_grad_(True)
        if how == "whole":
            lp_all = log_probs_all(logits, T, k, p, keep=tokens)
            lp = lp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            l0 = lp_all.masked_fill(torch.isinf(lp_all), 0.0) if entropy_grad else lp_all.detach().masked_fill(torch.isinf(lp_all.detach()), 0.0)
            ent = -(l0.exp() * l0).sum(-1)
        else:
            lp, ent = response_logp(logits, tokens, T, k, p, entropy=True, entropy_grad=entropy_grad, chunk=8)
        loss = (lp * w).sum() + (0.1 * ent.sum() if entropy_grad else 0)
        loss.backward()
        out[how] = (lp.detach(), ent.detach(), logits.grad)
    for a, b in zip(out["whole"], out["chunked"]):
        assert torch.equal(a, b)
    assert len(calls) == (5 if path == "chunked" else 0)  # 37 positions in chunks of 8, each checkpointed
