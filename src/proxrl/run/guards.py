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


def clip_grad_norm(params: list[nn.Parameter], max_grad_norm: float, update: Optional[int], where: str = "",
                   check: bool = True) -> Tensor:
    """Clip the global gradient norm to ``max_grad_norm`` (0 disables clipping) and check it is finite
    (``check``; off under a gradient scaler, which skips a step with inf/NaN gradients itself); returns the
    norm before clipping."""
    if max_grad_norm > 0:
        norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    if check:
        check_finite("gradient norm", norm, update, where)
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
