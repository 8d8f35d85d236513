"""Policies for Gymnasium spaces: separate actor and critic MLPs (DETAILS 3), three action heads.

* ``Discrete`` → Categorical; ``MultiDiscrete`` → independent Categoricals (log-probs summed);
* ``Box`` → diagonal Gaussian with a state-independent log-std initialised to ``log_std_init``
  (DETAILS 7); log-probs summed over dimensions. The action sent to the env is clipped to the
  bounds by the rollout; the unclipped sample is what is stored and trained on.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.distributions import Categorical, Independent, Normal

from .. import core
from ..run.guards import ContiguousParams, FlatGrads


def _layer(n_in: int, n_out: int, gain: float) -> nn.Linear:
    """Orthogonal weights with the given gain, zero bias (DETAILS 3)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class _Categorical(Categorical):
    """``Categorical(logits=..., validate_args=False)`` with the per-call overhead removed, and still a
    ``Categorical`` for ``kl_divergence``, ``entropy`` and ``probs``. Hot on the gym path: once per env step
    and per minibatch. Normalises with the fused ``log_softmax`` (torch's ``logits − logsumexp`` is six
    kernels: ~8× slower on rollout-sized batches) and samples by inverting the CDF with one uniform draw per
    row (exact; ~2× cheaper than ``torch.multinomial`` on rollout-sized batches)."""

    def __init__(self, logits: Tensor):  # noqa: D107 - skips Distribution.__init__'s shape checks
        self.logits = torch.log_softmax(logits, dim=-1)
        self._param = self.logits
        self._num_events = logits.shape[-1]
        self._batch_shape = logits.shape[:-1]
        self._event_shape = torch.Size()
        self._validate_args = False

    def log_prob(self, value: Tensor) -> Tensor:
        return self.logits.gather(-1, value.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        """−Σ p·log p from the normalised log-probs (torch's version clamps them and builds a second softmax,
        three more kernels and their backward per minibatch; an MLP's log-probs are finite, so no clamp)."""
        return -(self.logits.exp() * self.logits).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        if sample_shape:
            return super().sample(sample_shape)
        cdf = self.logits.exp().cumsum(-1)  # [..., K]
        u = torch.rand(cdf.shape[:-1] + (1,), dtype=cdf.dtype, device=cdf.device)
        return core.inverse_cdf_sample(cdf, u)


_ACTIVATIONS = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu}


def forward_mlp(net: nn.Sequential, x: Tensor) -> Tensor:
    """``net(x)`` for an :func:`mlp` without nn.Module call overhead (identical ops, identical result)."""
    for layer in net:
        if type(layer) is nn.Linear:
            x = F.linear(x, layer.weight, layer.bias)
        else:
            x = _ACTIVATIONS[type(layer)](x)
    return x


def mlp(n_in: int, hidden: Sequence[int], n_out: int, activation: str, out_gain: float) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_layer(n_in, h, math.sqrt(2)), act()]
        n_in = h
    layers.append(_layer(n_in, n_out, out_gain))
    return nn.Sequential(*layers)


class MultiCategorical:
    """Independent categoricals over the sub-actions of a MultiDiscrete space."""

    def __init__(self, logits: Tensor, nvec: Sequence[int]):
        self.dists = [_Categorical(l) for l in torch.split(logits, list(nvec), dim=-1)]  # inverse-CDF draws

    def sample(self) -> Tensor:
        return torch.stack([d.sample() for d in self.dists], dim=-1)

    def log_prob(self, a: Tensor) -> Tensor:
        return sum(d.log_prob(a[..., i]) for i, d in enumerate(self.dists))

    def entropy(self) -> Tensor:
        return sum(d.entropy() for d in self.dists)

    @property
    def mode(self) -> Tensor:
        return torch.stack([d.probs.argmax(-1) for d in self.dists], dim=-1)


@torch.distributions.kl.register_kl(_Categorical, _Categorical)  # type: ignore[misc]
def _kl_categorical(p: _Categorical, q: _Categorical) -> Tensor:  # pragma: no cover - registry
    """Σ p·(log p − log q) from the normalised log-probs (core.categorical_kl; torch's version adds a softmax
    and two masked assignments for zero probabilities, which finite MLP log-probs never have)."""
    return core.categorical_kl(p.logits, q.logits)


@torch.distributions.kl.register_kl(MultiCategorical, MultiCategorical)  # type: ignore[misc]
def _kl_multicategorical(p: MultiCategorical, q: MultiCategorical) -> Tensor:  # pragma: no cover - registry
    return sum(torch.distributions.kl_divergence(a, b) for a, b in zip(p.dists, q.dists))


class ActorCritic(nn.Module):
    """π(a|s) and V(s) as two separate MLPs. ``kind`` is 'discrete', 'multidiscrete' or 'continuous'."""

    def __init__(self, obs_dim: int, kind: str, act_dim: int, nvec: Sequence[int] = (), hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0, critic: bool = True):
        super().__init__()
        self.kind, self.act_dim, self.nvec = kind, act_dim, tuple(int(n) for n in nvec)
        n_out = sum(self.nvec) if kind == "multidiscrete" else act_dim
        self.actor = mlp(obs_dim, hidden, n_out, activation, out_gain=0.01)
        self.critic = mlp(obs_dim, hidden, 1, activation, out_gain=1.0) if critic else None
        if kind == "continuous":
            self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))
        self.store: Optional[ContiguousParams] = None  # set by make_contiguous (training)

    def make_contiguous(self) -> ContiguousParams:
        """Move the parameters onto contiguous storage, network 0 the actor (with ``log_std``), network 1 the
        critic (:class:`~proxrl.run.guards.ContiguousParams`): the optimizer steps one tensor per network.
        Call after ``.to(device)`` and before building the optimizer; the values and ``state_dict`` are
        unchanged."""
        nets = [self.actor_parameters()] + ([list(self.critic.parameters())] if self.critic is not None else [])
        self.store = ContiguousParams(nets)
        return self.store

    def flat_grads(self, actor: bool, critic: bool) -> Optional[FlatGrads]:
        """The gradients of the actor and/or critic as one flat range (None without contiguous storage)."""
        if self.store is None:
            return None
        return self.store.grads([i for i, on in ((0, actor), (1, critic and self.critic is not None)) if on])

    @classmethod
    def for_spaces(cls, obs_space, act_space, **kw) -> "ActorCritic":
        import gymnasium as gym

        obs_dim = int(np.prod(obs_space.shape))
        if isinstance(act_space, gym.spaces.Discrete):
            return cls(obs_dim, "discrete", int(act_space.n), **kw)
        if isinstance(act_space, gym.spaces.MultiDiscrete):
            return cls(obs_dim, "multidiscrete", len(act_space.nvec), nvec=act_space.nvec.reshape(-1), **kw)
        if isinstance(act_space, gym.spaces.Box):
            return cls(obs_dim, "continuous", int(np.prod(act_space.shape)), **kw)
        raise TypeError(f"unsupported action space {act_space}")

    def actor_parameters(self) -> list[nn.Parameter]:
        ps = list(self.actor.parameters())
        if self.kind == "continuous":
            ps.append(self.log_std)
        return ps

    def dist(self, obs: Tensor):
        """The action distribution at ``obs`` [..., obs_dim]; ``log_prob`` is summed over action dims."""
        return self.distribution(forward_mlp(self.actor, obs), self.log_std if self.kind == "continuous" else None)

    def distribution(self, out: Tensor, log_std: Optional[Tensor] = None):
        """The distribution for actor outputs ``out`` (and, for Gaussians, ``log_std``): the one place that
        builds it, for the live policy and for a :meth:`snapshot` of π_old alike."""
        if self.kind == "discrete":
            return _Categorical(out)
        if self.kind == "multidiscrete":
            return MultiCategorical(out, self.nvec)
        return Independent(Normal(out, log_std.exp().expand_as(out), validate_args=False), 1, validate_args=False)

    @torch.no_grad()
    def snapshot(self, obs: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """π_old at ``obs``, frozen: ``self.distribution(*snapshot)`` is its distribution after θ moves."""
        log_std = self.log_std.detach().clone() if self.kind == "continuous" else None
        return forward_mlp(self.actor, obs), log_std

    def value(self, obs: Tensor) -> Tensor:
        if self.critic is None:
            raise RuntimeError("this rung has no critic")
        return forward_mlp(self.critic, obs).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        d = self.dist(obs)
        if deterministic:
            return d.mode if self.kind != "continuous" else d.base_dist.loc
        return d.sample()
