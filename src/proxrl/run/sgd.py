"""The optimizer loop every SGD stage shares: epochs × shuffled minibatches, one optimizer step each.

Used by the gym rungs 1–6 (and their separately fitted critic), RL on tokens (a minibatch being
gradient-accumulated over micro-batches inside ``minibatch_step``), SFT and the reward model. What a
minibatch's loss is belongs to the caller; the loop owns the order of minibatches, zeroing, the gradient
clip and its finite check, the step, and early stopping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .guards import FlatGrads, clip_grad_norm


def minibatches(n: int, num_minibatches: int, generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """A fresh permutation of ``range(n)`` split into ``num_minibatches`` near-equal parts covering every
    index (the global torch RNG when ``generator`` is None). Never an empty part, whose mean loss would be
    NaN: with fewer than ``num_minibatches`` indices (a gym batch whose autoreset steps were dropped) each
    index is a minibatch of its own; ``n = 0`` gives none."""
    if n <= 0:
        return []
    return list(torch.randperm(n, generator=generator).tensor_split(min(num_minibatches, n)))


def backward(loss: Tensor, scaler=None) -> None:
    """``loss.backward()``, the loss multiplied by the gradient scaler's scale first when there is one
    (:class:`torch.amp.GradScaler`: fp16 gradients that would underflow are kept representable)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


@dataclass
class SGDResult:
    stats: list[dict] = field(default_factory=list)   # one dict per optimizer step, as minibatch_step returned
    grad_norms: list[float] = field(default_factory=list)  # NaN for a step the gradient scaler skipped
    epochs_done: int = 0
    stopped_early: bool = False

    @property
    def skipped(self) -> list[bool]:
        """Per step: the gradient scaler found inf/NaN gradients and skipped it (its norm is NaN)."""
        return [math.isnan(g) for g in self.grad_norms]

    @property
    def steps_skipped(self) -> int:
        return sum(self.skipped)


def sgd_epochs(optimizers: Sequence[torch.optim.Optimizer], params: list[nn.Parameter], epochs: int,
               order: Callable[[], Sequence[Tensor]], max_grad_norm: float, update: Optional[int],
               minibatch_step: Callable[[Tensor, str], dict],
               stop_after_epoch: Optional[Callable[[dict], bool]] = None,
               after_step: Optional[Callable[[int, dict, float], None]] = None, dist=None,
               reduce_stats: bool = False, flat_grads: Optional[FlatGrads] = None, scaler=None,
               start: tuple[int, int] = (0, 0)) -> SGDResult:
    """``epochs`` passes; each pass takes its minibatches from ``order()`` (a fresh shuffle: e.g.
    :func:`minibatches` or :func:`chunks`). Per minibatch: zero the gradients, ``minibatch_step(indices,
    where)`` (computes the loss, calls backward and returns its statistics; ``where`` says "(epoch e,
    minibatch j)" for error messages), clip the global gradient norm (``max_grad_norm``, 0 = off) and check
    it is finite, step every optimizer, then ``after_step(epoch, stats, grad_norm)`` (per-step logging).
    ``stop_after_epoch(last_stats)`` returning True ends the passes early (PPO's ``target_kl``).

    With ``dist`` (:class:`proxrl.run.dist.Dist`, several processes) ``minibatch_step`` gets the global
    indices and computes this rank's share of the loss (weighted by its share of the minibatch); an error
    on any rank is agreed on before the gradients are summed over ranks, so every rank takes the same step
    or raises the same error. ``reduce_stats``: the tensor statistics ``minibatch_step`` returns are this
    rank's shares and are summed over ranks (after the error check), so every rank sees the minibatch's.
    ``flat_grads``: the gradients of ``params`` as one flat range (:class:`~proxrl.run.guards.FlatGrads` of
    contiguous parameters; every parameter must get a gradient from each minibatch's loss) — the gym's small
    networks, where per-tensor kernels dominate. On several processes its steps after the first then take one
    collective each (:meth:`~proxrl.run.dist.Dist.sum_step`: the error check, the statistics and the
    gradients together), which needs every step to return the first step's statistics.

    ``start`` = (epoch, minibatch), both from 0: continue a loop stopped there (a resumed run) — the earlier
    epochs are not run (``order`` is not called for them) and the first ``minibatch`` parts of that epoch's
    ``order()`` are skipped; the caller makes ``order()`` draw that epoch's permutation again.

    ``scaler`` (a :class:`torch.amp.GradScaler`, fp16; ``minibatch_step`` then backpropagates
    ``scaler.scale(loss)``, :func:`backward`): the gradients are unscaled before the clip; when they hold
    inf/NaN the scaler skips the step and lowers its scale instead of the finite-gradient guard raising — the
    step is recorded in ``SGDResult.skipped`` and ``after_step`` gets a NaN gradient norm for it. The loss
    itself is still the caller's to check. On several processes the gradients are summed before the
    unscale, so every rank skips the same steps. (With several optimizers the scaler skips each one whose
    gradients overflowed; the step counts as skipped when any did. Every LM stage has one.)"""
    if flat_grads is not None and scaler is not None:
        raise ValueError("sgd_epochs: flat_grads and a gradient scaler are not combined")
    out = SGDResult()
    stat_keys: Optional[list[str]] = None  # known after the first step (every rank returns the same keys)
    for epoch in range(start[0], epochs):
        st: dict = {}
        parts = list(order())
        skip = start[1] if epoch == start[0] else 0
        for j, idx in enumerate(parts[skip:], skip):
            where = f" (epoch {epoch + 1}, minibatch {j + 1})" if update is not None else \
                f" (epoch {epoch + 1}, step {len(out.stats) + 1})"
            if flat_grads is not None:
                flat_grads.attach()  # zeroes and sets every gradient the optimizers see
            else:
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
            if dist is not None and dist.on:
                err = None
                try:
                    st = minibatch_step(idx, where)
                except Exception as e:  # noqa: BLE001 - agreed on by all ranks, then re-raised
                    err = e
                if flat_grads is not None and stat_keys is not None:  # error check, statistics, gradients: one
                    st = dist.sum_step(err, flat_grads.flat, st, stat_keys)  # collective (in place on the range)
                else:
                    dist.agree(err)
                    if flat_grads is not None:
                        dist.all_reduce_(flat_grads.flat)  # in place: the parameters' gradients are its views
                    else:
                        dist.all_reduce_grads(params)
                    keys = sorted(k for k, v in st.items() if isinstance(v, Tensor)) if reduce_stats else []
                    if keys:
                        flat = dist.all_reduce_(torch.stack([st[k].detach().double().reshape(()) for k in keys]))
                        st = {**st, **{k: flat[i] for i, k in enumerate(keys)}}
                    stat_keys = keys  # the next steps' statistics: the same keys (sum_step checks)
            else:
                st = minibatch_step(idx, where)
            if scaler is None:
                norm = float(flat_grads.clip(max_grad_norm, update, where) if flat_grads is not None
                             else clip_grad_norm(params, max_grad_norm, update, where))
                for opt in optimizers:
                    opt.step()
            else:
                for opt in optimizers:
                    scaler.unscale_(opt)
                norm = float(clip_grad_norm(params, max_grad_norm, update, where, check=False))
                scale = scaler.get_scale()
                for opt in optimizers:
                    scaler.step(opt)  # skipped by the scaler when its gradients held inf/NaN
                scaler.update()
                if scaler.get_scale() < scale:  # the scale is lowered exactly when inf/NaN was found
                    norm = math.nan  # a skipped step (SGDResult.skipped)
            out.stats.append(st)
            out.grad_norms.append(norm)
            if after_step is not None:
                after_step(epoch, st, norm)
        out.epochs_done = epoch + 1
        if stop_after_epoch is not None and epoch < epochs - 1 and stop_after_epoch(st):  # early: epochs were left
            out.stopped_early = True
            break
    return out


def chunks(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    """A fresh permutation of ``range(n)`` cut into chunks of ``size`` (the last may be shorter): the
    optimizer batches of SFT and the reward model, whose data need not divide evenly."""
    return list(torch.randperm(n, generator=generator).split(size))
