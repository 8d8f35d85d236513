"""One batch schema for environment steps and for tokens.

Both rollouts — vectorised Gymnasium envs and sampled LM responses — produce a :class:`Batch` of
``[B, T]`` tensors; :mod:`proxrl.objective` and :mod:`proxrl.core` consume it the same way.

=============  =========  ==========================================================================
field          shape      meaning
=============  =========  ==========================================================================
obs            [B,T,...]  what the policy saw (normalised env observations; for LMs, unused here:
                          the LM rollout keeps token ids beside the batch)
actions        [B,T,...]  actions taken (env actions as sampled, unclipped; token ids)
logp_old       [B,T]      log π_old(a|s) of the behaviour policy
rewards        [B,T]      per-step reward (for LMs: −β·KL to the reference + score on the last token)
terminated     [B,T]      episode ended in a terminal state at this step (EOS for LMs)
truncated      [B,T]      episode was cut at this step (time limit; length limit for LMs)
mask           [B,T]      1 = a real step to train on; 0 = padding or a Gymnasium autoreset step
values         [B,T]      V(s_t) from the critic, or None without a critic
next_values    [B,T]      V(s_{t+1}) (V(final obs) where the episode ended), or None
logp_ref       [B,T]      log π_ref(a|s) of the frozen reference (RLHF), or None
adv, ret       [B,T]      filled by :func:`proxrl.objective.estimate_advantages`
=============  =========  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from torch import Tensor


@dataclass
class Batch:
    obs: Optional[Tensor]
    actions: Tensor
    logp_old: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    mask: Tensor
    values: Optional[Tensor] = None
    next_values: Optional[Tensor] = None
    logp_ref: Optional[Tensor] = None
    adv: Optional[Tensor] = None
    ret: Optional[Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rewards.shape)  # type: ignore[return-value]

    def replace(self, **changes) -> "Batch":
        return replace(self, **changes)

    def flatten_valid(self) -> "Batch":
        """Flatten ``[B, T]`` to ``[N, 1]`` keeping only steps with ``mask`` = 1 (the gym path trains on
        independent samples; the LM path keeps sequences and masks tokens instead)."""
        keep = self.mask.reshape(-1).bool()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
                continue
            flat = v.reshape(-1, *v.shape[2:])[keep]
            out[f.name] = flat.unsqueeze(1)  # [N, 1, ...]
        return Batch(**out)

    def index(self, idx: Tensor) -> "Batch":
        """Select rows (the B dimension)."""
        return Batch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                        for f in fields(self)})
