"""``--parallel fsdp``: the LM stages' models sharded over the ranks with FSDP2 (``fully_shard``), for models
whose replicated weights, gradients and Adam state do not fit on every device.

What stays the same as ``--parallel ddp`` (:mod:`proxrl.run.dist`): the rows each rank computes, the loss
shares (each rank's loss weighted by its rows' share of the global minibatch) and therefore the step — FSDP2
*sums* the gradient shards (divide factor 1, sum-only collectives), where its default would average them.
Averaging is exactly the class of bug the 2-process-equals-1 tests catch (and on gloo FSDP2's own averaging
path has been wrong, pytorch issue 162338): the gradients must be the single-process gradients, not 1/N of them.

What differs, and why each piece here exists:

* **Sharding** (:func:`shard_model`): every transformer block (the model's ``_no_split_modules`` classes, as
  Hugging Face declares them) is one FSDP2 unit, the rest of the model (embeddings, final norm, LM head) the
  root unit; trainable (LoRA or full) and frozen weights alike. The value/reward heads stay replicated
  (their gradients are all-reduced with the DDP path's buffer).
* **Generation and the no-grad forwards** run with the parameters gathered (:func:`gathered`: one all-gather
  of each unit, then no collective until the reshard), so ranks may sample different numbers of tokens and
  run different numbers of chunks.
* **Training forwards are collectives** (each unit all-gathers in forward and reduce-scatters in backward), so
  every rank runs the same number of micro-batches: :func:`lockstep` pads a rank's list with zero-weight
  passes, and a NaN found on one rank is raised after the micro-batch loop (all ranks then agree on it),
  never in the middle of it.
* **Checkpoints are full tensors** (:func:`full`), written by rank 0 in the same safetensors + JSON format as
  every run, so a run checkpointed with FSDP on N processes resumes on any number (and with ddp); loaded
  tensors are cut into this rank's shard (:func:`like`, :func:`shard_optimizer_state`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn


@functools.cache
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor cannot shard: nothing is ever a DTensor
        return None
    return DTensor


def is_sharded(t) -> bool:
    D = _dtensor_type()
    return D is not None and isinstance(t, D)


def full(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it); ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (its storage: in-place ops on it change the parameter); ``t``
    itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (a full tensor, the same on every rank) laid out as ``param``: cut into this rank's shard when
    ``param`` is sharded (no communication: each rank keeps its own chunk), else unchanged."""
    if not is_sharded(param) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype) if value.is_floating_point() else value.to(param.device),
                             param.device_mesh, param.placements, src_data_rank=None)


def to_layout(module: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint tensors (full) keyed like ``module``'s parameters, each laid out as its parameter."""
    params = dict(module.named_parameters())
    return {k: like(v, params[k]) if k in params else v for k, v in tensors.items()}


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``opt.load_state_dict`` of full tensors: every per-parameter state tensor of a sharded parameter's
    shape (Adam's moments) becomes a shard like its parameter (``step`` stays a scalar)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or not is_sharded(p):
                continue
            for k, v in list(st.items()):
                if isinstance(v, Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = like(v, p)


def fsdp_modules(model: Optional[nn.Module]) -> list[nn.Module]:
    if model is None:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def block_classes(model: nn.Module) -> set[str]:
    """The class names of the transformer blocks (Hugging Face's ``_no_split_modules``), found on the model or,
    under a peft wrapper, on the model inside it."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_model(model: nn.Module, dist, device: str, warmup=None) -> nn.Module:
    """``fully_shard`` each transformer block of ``model`` and then the model itself over all ranks, summing
    gradients (divide factor 1, sum-only reduction: the loss shares are already the global minibatch's); then
    one no-grad forward of one token (``warmup(model, ids)``; default: a causal LM's call), so FSDP2's lazy
    initialisation happens outside inference mode. Marks ``dist.fsdp``. Returns ``model`` (sharded in place).

    The root's output must be what the loss is computed from (its backward hooks gather its weights): a
    reward model is sharded whole (trunk and head), not its LM, whose logits the score never uses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..errors import ConfigError

    mesh = init_device_mesh(torch.device(dist.device).type, (dist.world,))
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError("parallel", f"--parallel fsdp: {type(model).__name__} declares no transformer block classes "
                          "(_no_split_modules) to shard", "use --parallel ddp")
    # reshard after every forward, the root too (FSDP2 keeps the root gathered by default): outside
    # gathered() every registered parameter is then always the shard — the optimizer, checkpoints and loads
    # see the same tensors whichever forward ran last
    for b in blocks:
        fully_shard(b, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        warmup(model, one) if warmup is not None else model(input_ids=one, use_cache=False)
    if not all(is_sharded(p) for p in model.parameters()):
        raise RuntimeError("fsdp: a parameter stayed gathered after the first forward")
    dist.fsdp = True
    return model


@contextlib.contextmanager
def gathered(*models: Optional[nn.Module]) -> Iterator[None]:
    """Inside: the sharded models' parameters all-gathered once (each unit unsharded, and kept so across
    forwards), so forwards need no collective — generation with per-rank lengths, chunked no-grad forwards.
    Resharded on exit. A no-op for models that are not sharded. Enter it outside ``torch.inference_mode``
    (the gathered weights must be ordinary tensors); weights must not be assigned while inside."""
    mods = [m for model in models for m in fsdp_modules(model)]
    if not mods:
        yield
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError("gathered() entered under torch.inference_mode: enter it first")
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def lockstep(pieces: Sequence[Tensor], dist, fallback: Tensor) -> list[tuple[Tensor, bool]]:
    """``(piece, real)`` for each non-empty piece of this rank's rows; with sharded models (``dist.fsdp``)
    padded with ``(fallback, False)`` up to the largest count over the ranks, so every rank runs the same
    number of (collective) forwards and backwards — a ``real=False`` pass must contribute nothing (weight 0)."""
    out = [(p, True) for p in pieces if len(p)]
    if dist is None or not getattr(dist, "fsdp", False) or not dist.on:
        return out
    n = int(dist.all_reduce_(torch.tensor([len(out)], dtype=torch.long), "max"))
    return out + [(fallback, False)] * (n - len(out))


class Deferred:
    """Errors of one rank held back until every rank has finished its collective passes: with sharded models
    an error raised mid-loop would leave the other ranks waiting in a collective. ``call(fn)`` runs ``fn``;
    with ``defer`` its :class:`~proxrl.errors.NumericsError` is kept (the first one) instead of raised, and
    :meth:`raise_first` raises it after the loop (then agreed on by all ranks, :meth:`Dist.agree`)."""

    def __init__(self, defer: bool):
        self.defer, self.error = defer, None

    def call(self, fn, *args) -> None:
        from ..errors import NumericsError

        if not self.defer:
            fn(*args)
            return
        try:
            fn(*args)
        except NumericsError as e:
            self.error = self.error or e

    def raise_first(self) -> None:
        if self.error is not None:
            raise self.error


def grad_norm_sq(grads: Iterable[Tensor]) -> Tensor:
    """Σ‖g‖² over gradients some of which are shards: each shard's local sum all-reduced over the ranks,
    replicated gradients (already summed over ranks) counted once. float64."""
    import torch.distributed as td

    grads = list(grads)
    sharded = [local(g) for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    sq = torch.zeros((), dtype=torch.float64, device=(sharded or plain)[0].device)
    for g in sharded:
        sq = sq + g.double().pow(2).sum()
    if sharded:
        td.all_reduce(sq)
    for g in plain:
        sq = sq + g.double().pow(2).sum()
    return sq
