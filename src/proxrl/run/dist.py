"""One run, any number of processes: the distributed context of a stage, on PyTorch's own engine.

``torchrun --nproc_per_node N -m proxrl <command>`` sets RANK/WORLD_SIZE/LOCAL_RANK; :func:`context` then
joins the process group (NCCL on CUDA, gloo on CPU) and every stage computes the run of one process with
the same global batch (DETAILS 23–27):

* batch sizes in the config are global; each rank produces its share of the rollout batch (samples,
  scores, forwards), then the per-row results are all-gathered so that every rank holds the whole batch —
  statistics over it (whitening, KL for the controllers, token counts of the loss weights) are then the
  single-process ones by construction;
* each minibatch of one global permutation is split across ranks; each rank's loss is weighted by its
  rows' share of the global minibatch and the gradients are all-reduced (summed), so the step is the
  single-process step up to float summation order;
* decisions are collective: an error on one rank (NaN, a failing reward function) is agreed on by all
  ranks before the next collective, so every rank stops with the same one-line error instead of hanging;
* rank 0 prints and writes; the others wait at a barrier.

Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op and nothing is imported.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ProxrlError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    fsdp: bool = False  # the stage's models are sharded (--parallel fsdp, proxrl.run.fsdp.shard_model)
    comm_s: float = 0.0  # seconds spent in this object's collectives (waiting for the slower rank included)

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- shards
    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (``tensor_split`` sizes: the first n % world ranks
        hold one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def shares(self, n: int) -> list[int]:
        """Every rank's row count of :meth:`shard` ``(n)``, in rank order."""
        base, extra = divmod(n, self.world)
        return [base + (1 if r < extra else 0) for r in range(self.world)]

    def local(self, idx: Tensor) -> Tensor:
        """This rank's part of a minibatch's global row indices."""
        return idx.tensor_split(self.world)[self.rank] if self.on else idx

    # ---- collectives (on NCCL tensors travel on the GPU, on gloo on the CPU)
    @property
    def comm_device(self) -> str:
        return self.device if self.device.startswith("cuda") else "cpu"

    @contextmanager
    def _timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.comm_s += time.perf_counter() - t0

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.on:
            import torch.distributed as td

            c = t.to(self.comm_device)
            with self._timed():
                td.all_reduce(c, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM)
            if c is not t:
                t.copy_(c)
        return t

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every gradient over ranks, in one flat buffer (parameters without a gradient count as 0). A
        parameter that has a gradient on no rank (a value head no loss uses) keeps none, as on one process —
        Adam skips it there, and a zero gradient would give it optimizer state and steps that depend on the
        process count. FSDP2 shards (``--parallel fsdp``) are left alone: their backward already
        reduce-scattered the sum."""
        if not self.on:
            return
        if self.fsdp:
            from .fsdp import is_sharded

            params = [p for p in params if not is_sharded(p)]
            if not params:
                return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has])  # the flags travel with the gradients
        self.all_reduce_(flat)  # on the parameters' device (moved for gloo when they are on a GPU)
        off, held = 0, flat[-len(params):].tolist()
        for p, g, h in zip(params, grads, held):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(g).clone() if h > 0 else None
            off += n

    def sum_step(self, error: Optional[BaseException], flat: Tensor, stats: dict, keys: Sequence[str]) -> dict:
        """One collective for a minibatch step: the error check of :meth:`agree`, the statistics ``keys`` of
        ``stats`` (this rank's shares, summed) and the gradient range ``flat`` (summed in place), in one
        buffer of ``flat``'s dtype (float32 at least; bytes are time: a float64 copy of a 140k-parameter
        gradient doubles the all-reduce's cost on gloo) — the gym's steps take a millisecond, and each
        collective costs a few hundred microseconds on gloo. Every rank's ``stats`` must hold the tensors
        ``keys``: a rank without one counts as failed, so the buffers always have the same size. Returns
        ``stats`` with the sums."""
        missing = [k for k in keys if not isinstance(stats.get(k), Tensor)]
        if error is None and missing:
            error = RuntimeError(f"a minibatch step returned no statistic {missing[0]!r} (the first step did)")
        kind = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
        vals = [stats[k].detach().reshape(()).to(self.comm_device, kind) for k in keys] if error is None \
            else [torch.zeros((), dtype=kind, device=self.comm_device)] * len(keys)
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=kind, device=self.comm_device)
        buf = torch.cat([flag, torch.stack(vals) if vals else flag[:0],
                         flat.detach().reshape(-1).to(self.comm_device, kind)])
        self.all_reduce_(buf)
        if float(buf[0]) > 0:
            self._raise_agreed(error)
        flat.copy_(buf[1 + len(keys):].view_as(flat))
        return {**stats, **{k: buf[1 + i] for i, k in enumerate(keys)}}

    def gather_tensors(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Every rank's ``tensors`` (any shapes, any real dtypes), as ``out[i][r]`` = rank r's tensor i: two
        collectives whatever their number (the shapes, then one float64 buffer; float64 holds every value of
        the narrower floats, bools and integers below 2**53 exactly)."""
        if not self.on:
            return [[t] for t in tensors]
        import torch.distributed as td

        dev = self.comm_device
        dims = max([t.dim() for t in tensors] + [0])
        shape = torch.full((len(tensors), dims + 1), -1, dtype=torch.long)  # ndim, then the sizes
        for i, t in enumerate(tensors):
            shape[i, 0] = t.dim()
            shape[i, 1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.long)
        shapes = [torch.empty_like(shape, device=dev) for _ in range(self.world)]
        with self._timed():
            td.all_gather(shapes, shape.to(dev))
        sizes = [[list(row[1:1 + int(row[0])].tolist()) for row in s.cpu()] for s in shapes]
        counts = [sum(math.prod(z) for z in zs) for zs in sizes]
        if max(counts) == 0:  # nothing to send anywhere (every rank knows)
            return [[torch.zeros(z, dtype=t.dtype, device=t.device) for z in (s[i] for s in sizes)]
                    for i, t in enumerate(tensors)]
        send = torch.zeros(max(counts), dtype=torch.float64, device=dev)
        if tensors:
            mine = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
            send[: mine.numel()] = mine
        recv = [torch.empty_like(send) for _ in range(self.world)]
        with self._timed():
            td.all_gather(recv, send)
        out: list[list[Tensor]] = [[] for _ in tensors]
        for r in range(self.world):
            off = 0
            for i, (t, z) in enumerate(zip(tensors, sizes[r])):
                n = math.prod(z)
                out[i].append(recv[r][off:off + n].view(z).to(t.device, t.dtype))
                off += n
        return out

    def gather_rows(self, t: Tensor, pad_value=0, rows: Optional[Sequence[int]] = None) -> Tensor:
        """Concatenate every rank's rows ``[b_r, *rest]`` in rank order; trailing dims are padded with
        ``pad_value`` to the largest (response lengths differ between ranks). ``rows``: every rank's b_r when
        the caller knows them and the trailing dims are the same on all ranks — then one collective, not two."""
        if not self.on:
            return t
        if rows is None:
            parts = self.gather_tensors([t])[0]
            full = [max(p.shape[d] for p in parts) for d in range(1, t.dim())]
            out = torch.full([sum(p.shape[0] for p in parts), *full], pad_value, dtype=t.dtype, device=t.device)
            off = 0
            for p in parts:
                out[(slice(off, off + p.shape[0]), *(slice(0, n) for n in p.shape[1:]))] = p
                off += p.shape[0]
            return out
        import torch.distributed as td

        home, kind = t.device, t.dtype
        c = t.to(self.comm_device, torch.uint8 if kind == torch.bool else kind)
        send = torch.zeros([max(rows), *c.shape[1:]], dtype=c.dtype, device=c.device)
        send[: c.shape[0]] = c
        recv = [torch.empty_like(send) for _ in range(self.world)]
        with self._timed():
            td.all_gather(recv, send)
        return torch.cat([r[:n] for r, n in zip(recv, rows)]).to(home, kind)

    def gather_objects(self, obj) -> list:
        if not self.on:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        with self._timed():
            td.all_gather_object(out, obj)
        return out

    def agree(self, error: Optional[BaseException]) -> None:
        """Collective error check: if any rank hit an error, every rank raises the first one (lowest rank)
        as the same one-line error. Call where a rank may fail alone, before the next collective."""
        if not self.on:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.long, device=self.comm_device)
        self.all_reduce_(flag)
        if int(flag) != 0:
            self._raise_agreed(error)

    def _raise_agreed(self, error: Optional[BaseException]) -> None:
        """Every rank knows that some rank failed: all raise the lowest failing rank's error."""
        msgs = self.gather_objects(None if error is None else (type(error).__name__, str(error)))
        r, (kind, msg) = next((i, m) for i, m in enumerate(msgs) if m is not None)
        if error is not None and r == self.rank:
            raise error
        raise RemoteError(kind, msg)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (a stop signal seen by one rank stops all)."""
        if not self.on:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.long, device=self.comm_device)
        self.all_reduce_(t)
        return bool(int(t))

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as td

            with self._timed():
                td.barrier()


class RemoteError(ProxrlError):
    """The error another rank hit, raised on this one so that all ranks stop with the same line."""

    def __init__(self, kind: str, msg: str):
        from ..errors import NumericsError

        self.kind = kind
        self.numerics = kind == NumericsError.__name__
        super().__init__(msg)


def refuse_several_processes(command: str) -> None:
    """One line instead of N independent runs writing one directory, for commands that run on one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..errors import ConfigError

        raise ConfigError("torchrun", f"`proxrl {command}` runs on one process (WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']}); several processes are for rlhf sft|rm|ppo|train",
                          "run it without torchrun")


_CONTEXT: Optional[Dist] = None


def context(device: str = "cpu") -> Dist:
    """The process's distributed context, created once: joins the torchrun process group when WORLD_SIZE > 1
    (the store is scoped by TORCHELASTIC_RESTART_COUNT so that workers restarted by ``--max-restarts`` do not
    meet keys a killed attempt left behind, DETAILS 27)."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = Dist(0, 1, device)
        return _CONTEXT
    import datetime

    import torch.distributed as td

    rank = int(os.environ["RANK"])
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not td.is_initialized():
        import atexit

        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store itself
        store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None if agent else world,
                            is_master=rank == 0 and not agent, timeout=datetime.timedelta(seconds=120))
        store = td.PrefixStore(f"proxrl/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        td.init_process_group(backend, store=store, rank=rank, world_size=world,
                              timeout=datetime.timedelta(seconds=120))
        atexit.register(lambda: td.is_initialized() and td.destroy_process_group())
    _CONTEXT = Dist(rank, world, device)
    return _CONTEXT
