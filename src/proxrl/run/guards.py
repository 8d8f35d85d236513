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
    """Every trainable parameter finite after the optimizer step (of a sharded one, this rank's shard: the
    caller agrees on the error over the ranks)."""
    from .fsdp import local

    for name, p in named:
        if p.requires_grad:
            check_finite(f"weight {name} after the optimizer step", local(p.detach()), update)


def clip_grad_norm(params: list[nn.Parameter], max_grad_norm: float, update: Optional[int], where: str = "",
                   check: bool = True) -> Tensor:
    """Clip the global gradient norm to ``max_grad_norm`` (0 disables clipping) and check it is finite
    (``check``; off under a gradient scaler, which skips a step with inf/NaN gradients itself); returns the
    norm before clipping."""
    from .fsdp import grad_norm_sq, is_sharded, local

    grads = [p.grad for p in params if p.grad is not None]
    if any(is_sharded(g) for g in grads):  # --parallel fsdp: the norm over every rank's shards, then each clipped
        norm = grad_norm_sq(grads).sqrt()
        return _clip_to([local(g) for g in grads], norm.to(local(grads[0]).dtype), max_grad_norm, update, where, check)
    if grads and len({(g.device, g.dtype) for g in grads}) == 1:
        # torch's clip_grad_norm_ on one device and dtype, without its per-call grouping (the same kernels and
        # order, so the same values bit for bit; ~40 % of its cost on a small gym network)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        return _clip_to(grads, norm, max_grad_norm, update, where, check)
    if max_grad_norm > 0:
        norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
    if check:
        check_finite("gradient norm", norm, update, where)
    return norm


def _clip_to(grads: list[Tensor], norm: Tensor, max_grad_norm: float, update: Optional[int], where: str,
             check: bool = True) -> Tensor:
    """Check the global ``norm`` of ``grads`` (``check``) and scale them in place to at most ``max_grad_norm``
    (0: no clip), as torch's ``clip_grad_norm_`` does; returns the norm."""
    if check:
        check_finite("gradient norm", norm, update, where)
    if max_grad_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(float(max_grad_norm) / (norm + 1e-6), max=1.0))
    return norm


class ContiguousParams:
    """The parameters of several networks moved onto contiguous storage, for small networks whose optimizer
    step, zeroing, gradient norm and clip are dominated by one kernel (and its Python) per tensor.

    Network ``i``'s parameters become views of ``leaves[i]``, a leaf tensor the optimizer steps (one tensor
    per network instead of one per layer: Adam's per-parameter bookkeeping happens once), and every gradient
    becomes a view of one buffer laid out the same way, into which backward accumulates in place. The
    modules, their ``state_dict`` and ``load_state_dict`` (an in-place copy) are unchanged; code that
    *rebinds* a parameter's ``.data`` would cut it off — assign in place (:func:`proxrl.core.assign_flat`).
    :meth:`grads` gives the :class:`FlatGrads` of the networks one SGD loop trains."""

    def __init__(self, networks: list[list[nn.Parameter]]):
        first = networks[0][0]
        if any(p.dtype != first.dtype or p.device != first.device for ps in networks for p in ps):
            raise ValueError("ContiguousParams needs parameters of one dtype on one device")
        sizes = [sum(p.numel() for p in ps) for ps in networks]
        self.grad = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
        self.leaves: list[nn.Parameter] = []
        self.members = [list(ps) for ps in networks]
        self._spans, self._views, off = [], [], 0
        for ps, n in zip(self.members, sizes):
            leaf = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in ps]))
            views, o = [], 0
            for p in ps:
                p.data = leaf.data[o:o + p.numel()].view_as(p)
                views.append(self.grad[off + o:off + o + p.numel()].view_as(p))
                o += p.numel()
            self.leaves.append(leaf)
            self._spans.append((off, off + n))
            self._views.append(views)
            off += n

    def grads(self, networks: list[int]) -> "FlatGrads":
        """The gradients of networks ``networks`` (consecutive indices) as one flat range."""
        if networks != list(range(networks[0], networks[-1] + 1)):
            raise ValueError("FlatGrads covers consecutive networks")
        return FlatGrads(self, networks)


class FlatGrads:
    """The gradients of some networks of a :class:`ContiguousParams` as one flat range of its buffer, so that
    zeroing, the global norm and the clip are one kernel each. Every parameter of those networks must get a
    gradient from each loss (the gym's minibatch steps): one left without would hold a zero gradient instead
    of none, and Adam would move it by its momentum."""

    def __init__(self, store: ContiguousParams, networks: list[int]):
        self.store, self.networks = store, networks
        self.flat = store.grad[store._spans[networks[0]][0]:store._spans[networks[-1]][1]]

    def attach(self) -> None:
        """Zero the range and make it the gradient of those networks' leaves and parameters; the other
        networks' leaves get none, so the optimizer does not step them (this replaces its zero_grad)."""
        self.flat.zero_()
        st = self.store
        for i, leaf in enumerate(st.leaves):
            if i not in self.networks:
                leaf.grad = None
                continue
            lo, hi = st._spans[i]
            leaf.grad = st.grad[lo:hi]
            for p, v in zip(st.members[i], st._views[i]):
                p.grad = v

    def clip(self, max_grad_norm: float, update: Optional[int], where: str = "") -> Tensor:
        """:func:`clip_grad_norm` of the range: the norm before clipping, checked finite."""
        return _clip_to([self.flat], torch.linalg.vector_norm(self.flat), max_grad_norm, update, where)


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
