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

import os
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

    def local(self, idx: Tensor) -> Tensor:
        """This rank's part of a minibatch's global row indices."""
        return idx.tensor_split(self.world)[self.rank] if self.on else idx

    # ---- collectives (on NCCL tensors travel on the GPU, on gloo on the CPU)
    @property
    def comm_device(self) -> str:
        return self.device if self.device.startswith("cuda") else "cpu"

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.on:
            import torch.distributed as td

            c = t.to(self.comm_device)
            td.all_reduce(c, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM)
            if c is not t:
                t.copy_(c)
        return t

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every gradient over ranks, in one flat buffer (parameters without a gradient count as 0). FSDP2
        shards (``--parallel fsdp``) are left alone: their backward already reduce-scattered the sum."""
        if not self.on:
            return
        if self.fsdp:
            from .fsdp import is_sharded

            params = [p for p in params if not is_sharded(p)]
            if not params:
                return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat)  # on the parameters' device (moved for gloo when they are on a GPU)
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(g).clone()
            off += n

    def gather_rows(self, t: Tensor, pad_value=0) -> Tensor:
        """Concatenate every rank's rows ``[b_r, *rest]`` in rank order; trailing dims are padded with
        ``pad_value`` to the largest (response lengths differ between ranks)."""
        if not self.on:
            return t
        import torch.distributed as td

        home, kind = t.device, t.dtype
        t = t.to(self.comm_device, torch.uint8 if kind == torch.bool else kind)
        shape = torch.tensor(list(t.shape), dtype=torch.long, device=self.comm_device)
        shapes = [torch.zeros_like(shape) for _ in range(self.world)]
        td.all_gather(shapes, shape)
        shapes = [s.tolist() for s in shapes]
        full = [max(s[d] for s in shapes) for d in range(1, t.dim())]
        padded = torch.full([t.shape[0], *full], pad_value, dtype=t.dtype, device=t.device)
        padded[tuple(slice(0, n) for n in t.shape)] = t
        bmax = max(s[0] for s in shapes)
        send = torch.full([bmax, *full], pad_value, dtype=t.dtype, device=t.device)
        send[: t.shape[0]] = padded
        recv = [torch.empty_like(send) for _ in range(self.world)]
        td.all_gather(recv, send)
        return torch.cat([r[: s[0]] for r, s in zip(recv, shapes)]).to(home, kind)

    def gather_objects(self, obj) -> list:
        if not self.on:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
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
        if int(flag) == 0:
            return
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
