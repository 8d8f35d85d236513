"""NaN/inf guards shared by every stage (DETAILS 15/LM-16): a non-finite quantity stops the run with a
one-line :class:`~proxrl.errors.NumericsError` naming the quantity, the update and where in the update it
happened — before the optimizer step, so the last good checkpoint is intact — or, with
``on_nonfinite='skip'``, the update is undone from a :class:`Backup` and logged, never silently."""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..errors import NumericsError


def check_finite(name: str, x: Tensor, update: Optional[int], where: str = "", mask: Optional[Tensor] = None) -> None:
    """Raise ``NumericsError("{name}: NaN|inf at update {update}{where}")`` if ``x`` (over ``mask``) is not
    finite (``update`` None: stages counted in steps, which ``where`` names)."""
    vals = x[mask.bool()] if mask is not None else x
    if not torch.isfinite(vals).all():
        kind = "NaN" if torch.isnan(vals).any() else "inf"
        at = f" at update {update}" if update is not None else ""
        raise NumericsError(f"{name}: {kind}{at}{where}")


def check_parameters(named: Iterable[tuple[str, Tensor]], update: int) -> None:
    """Every trainable parameter finite after the optimizer step."""
    for name, p in named:
        if p.requires_grad:
            check_finite(f"weight {name} after the optimizer step", p.detach(), update)


def clip_grad_norm(params: list[nn.Parameter], max_grad_norm: float, update: Optional[int], where: str = "") -> Tensor:
    """Clip the global gradient norm to ``max_grad_norm`` (0 disables clipping) and check it is finite;
    returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and len({(g.device, g.dtype) for g in grads}) == 1:
        # torch's clip_grad_norm_ on one device and dtype, without its per-call grouping (the same kernels and
        # order, so the same values bit for bit; ~40 % of its cost on a small gym network)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        check_finite("gradient norm", norm, update, where)
        if max_grad_norm > 0:
            torch._foreach_mul_(grads, torch.clamp(float(max_grad_norm) / (norm + 1e-6), max=1.0))
        return norm
    if max_grad_norm > 0:
        norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
    check_finite("gradient norm", norm, update, where)
    return norm


class FlatGrads:
    """The gradients of ``params`` as views of one flat buffer, so that zeroing, the global norm and the clip
    are one kernel each instead of one per tensor (on a small gym network the per-tensor norms alone are a
    tenth of a minibatch step). Backward accumulates into the views in place. For loops in which every
    parameter in ``params`` gets a gradient from each loss (the gym's minibatch steps): a parameter left
    without one would hold a zero gradient instead of none, and Adam would move it by its momentum."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = list(params)
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("FlatGrads needs parameters of one dtype on one device")
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views, off = [], 0
        for p in self.params:
            self.views.append(self.flat[off:off + p.numel()].view_as(p))
            off += p.numel()

    def attach(self) -> None:
        """Zero the buffer and make it every parameter's gradient (call after the optimizer's zero_grad)."""
        self.flat.zero_()
        for p, v in zip(self.params, self.views):
            p.grad = v

    def clip(self, max_grad_norm: float, update: Optional[int], where: str = "") -> Tensor:
        """:func:`clip_grad_norm` of the buffer: the norm before clipping, checked finite."""
        norm = torch.linalg.vector_norm(self.flat)
        check_finite("gradient norm", norm, update, where)
        if max_grad_norm > 0:
            self.flat.mul_(torch.clamp(float(max_grad_norm) / (norm + 1e-6), max=1.0))
        return norm


class Backup:
    """A copy of a module's state and its optimizers' state taken before an update, to undo it
    (``on_nonfinite='skip'``). ``state_dict``/``load`` default to the module's own; the LM side passes its
    trainable-only state so that frozen weights are not copied."""

    def __init__(self, module: nn.Module, optimizers: Iterable[Optional[torch.optim.Optimizer]], state_dict=None,
                 load=None, extra=None):
        self.module = module
        self.optimizers = list(optimizers)
        self._load = load or module.load_state_dict
        sd = (state_dict or module.state_dict)()
        self.weights = {k: v.detach().clone() for k, v in sd.items()}
        self.opt_states = [copy.deepcopy(o.state_dict()) if o is not None else None for o in self.optimizers]
        self.extra = copy.deepcopy(extra)

    def restore(self):
        """Put weights and optimizer state back; returns the ``extra`` object saved with them."""
        self._load(self.weights)
        for o, sd in zip(self.optimizers, self.opt_states):
            if o is not None:
                o.load_state_dict(sd)
                o.zero_grad(set_to_none=True)
        return self.extra
