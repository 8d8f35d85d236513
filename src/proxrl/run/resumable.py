"""Checkpoints, a graceful stop and an exact resume for the epoch-based LM stages (SFT, the reward model).

Their optimizer loop is :func:`proxrl.run.sgd.sgd_epochs` over ``chunks`` of a shuffled dataset. A
:class:`StageCheckpoints` wraps it: every ``checkpoint_every`` optimizer steps, and after the step in
progress when SIGINT/SIGTERM arrives, it writes a checkpoint marked unfinished (``"complete": false``) that
holds everything the rest of the run depends on — the trained weights, Adam's state, the fp16 gradient
scaler, the data-order generator as it was at the start of the current epoch (the epoch's permutation is
drawn again from it on resume and the minibatches already done are skipped), the global RNGs, the step,
epoch and minibatch, and a digest of the encoded data. ``--resume DIR`` (:func:`proxrl.lm.common.begin_stage`) continues
from it: the result is the uninterrupted run's, bit for bit on CPU (metrics lines apart from wall-clock
fields, and the final weights).

The stage's final checkpoint is written as before (weights only, no ``complete`` key: finished); a run
whose latest checkpoint is unfinished is refused by everything that loads a trained model from it
(:func:`check_finished`), with the command that finishes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal as _signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError
from . import checkpoint
from .fsdp import full, shard_optimizer_state
from .signals import RunInterrupted, StopSignals
from .state import (CHECKPOINT_VERSION, load_optimizer_state, optimizer_state, rng_state, scaler_state,
                    set_rng_state)

def data_digest(items: Sequence[Any]) -> str:
    """sha256 of the encoded data (token ids, masks) in order: a resume checks that it trains on the same."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_finished(run_dir: str | Path, state: dict) -> None:
    """Refuse, in one line, the latest checkpoint of an SFT or reward-model run stopped before its end."""
    if state.get("complete") is False:
        run = state.get("run", {})
        raise CheckpointError(f"{run_dir}: the {state.get('stage')} run stopped after step {state.get('step')} of "
                              f"{run.get('total_steps', '?')} and is not finished; finish it with: proxrl rlhf "
                              f"{state.get('stage')} --resume {run_dir}")


class StageCheckpoints:
    """The checkpoints, stop signals and resume of one SFT or reward-model run (see the module docstring).

    ``weights()`` returns the trained tensors under the keys of the stage's final checkpoint (on every rank:
    with FSDP it gathers the shards, a collective); ``load_weights(tensors)`` puts them back. Use as a context
    manager around the optimizer loop and the stage's final checkpoint and summary (a signal after the last step
    then lets the stage finish instead of killing it before its final checkpoint); :meth:`order` wraps the loop's ``order``, :meth:`after_step` its
    ``after_step``; :meth:`restore` returns the ``start`` to give :func:`~proxrl.run.sgd.sgd_epochs`."""

    def __init__(self, stage: str, cfg, dist, optimizer, scaler, generator: torch.Generator,
                 weights: Callable[[], dict[str, Tensor]], load_weights: Callable[[dict[str, Tensor]], None],
                 digest: str, total_steps: int, writer=None):
        self.stage, self.cfg, self.d, self.opt, self.scaler, self.g = stage, cfg, dist, optimizer, scaler, generator
        self.weights, self.load_weights, self.digest, self.total_steps = weights, load_weights, digest, total_steps
        self.writer = writer
        self.out = Path(cfg.out)
        self.step, self.epoch, self.minibatch, self.skipped = 0, 0, 0, 0
        self.epoch_start: Optional[Tensor] = None  # the generator's state when the current epoch's order was drawn
        self.elapsed0, self.t0 = 0.0, time.perf_counter()
        self.extra: dict = {}  # the stage's own state (e.g. a warning already given), saved and restored
        self.stop: Optional[StopSignals] = None

    def __enter__(self) -> "StageCheckpoints":
        self.stop = StopSignals().__enter__()
        return self

    def __exit__(self, *exc):
        return self.stop.__exit__(*exc)

    def elapsed(self) -> float:
        """Seconds of the run so far, the time before an interruption included (the metrics' ``time``)."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def order(self, draw: Callable[[], list[Tensor]]) -> Callable[[], list[Tensor]]:
        def wrapped() -> list[Tensor]:
            self.epoch_start = self.g.get_state()
            return draw()

        return wrapped

    def after_step(self, logged: Callable[[int, dict, float], None]) -> Callable[[int, dict, float], None]:
        """``logged`` (the stage's metrics line), then the step counted and, every ``checkpoint_every`` steps or
        when a stop signal arrived (on any rank), an unfinished checkpoint; after a signal the run stops with
        :class:`RunInterrupted` (exit 128 + signal), except at its last step (the stage then finishes)."""
        def wrapped(epoch: int, st: dict, grad_norm: float) -> None:
            logged(epoch, st, grad_norm)
            if epoch != self.epoch:
                self.epoch, self.minibatch = epoch, 0
            self.step, self.minibatch = self.step + 1, self.minibatch + 1
            self.skipped += int(grad_norm != grad_norm)  # NaN: a step the fp16 scaler skipped
            last = self.step >= self.total_steps
            signum = self.stop.signum if self.stop is not None else None
            stopping = self.d.any(signum is not None)  # a signal seen by one rank stops every rank
            every = self.cfg.checkpoint_every
            if not last and (stopping or (every and self.step % every == 0)):
                self.save()
            if stopping and not last:
                raise RunInterrupted(signum or _signal.SIGTERM, self.out, self.step, f"proxrl rlhf {self.stage}",
                                     unit="step")

        return wrapped

    def save(self) -> None:
        """An unfinished checkpoint (rank 0 writes; every rank gathers, as FSDP needs)."""
        self.d.barrier()
        tensors = dict(self.weights())
        opt_t, opt_meta = optimizer_state(self.opt, "optimizer")
        tensors.update({k: full(v) for k, v in opt_t.items()})  # fsdp: the moments gathered from the shards
        if self.d.main:
            rng_t, rng_meta = rng_state()
            tensors.update(rng_t)
            tensors["rng/epoch_start"] = self.epoch_start
            samples = self.writer.samples_path if self.writer is not None else None
            state = {"stage": self.stage, "version": CHECKPOINT_VERSION, "step": self.step, "complete": False,
                     "config": dataclasses.asdict(self.cfg),
                     "run": {"epoch": self.epoch, "minibatch": self.minibatch, "total_steps": self.total_steps,
                             "elapsed": self.elapsed(), "skipped": self.skipped, "optimizer": opt_meta,
                             "grad_scaler": scaler_state(self.scaler), "rng": rng_meta, "data_sha256": self.digest,
                             "world_size": self.d.world, "extra": self.extra,
                             "samples_bytes": samples.stat().st_size if samples is not None and samples.is_file() else None}}
            if self.writer is not None:
                self.writer.sync()
            checkpoint.save(self.out / "checkpoints", self.step, tensors, state, keep=self.cfg.keep_checkpoints)
        self.d.barrier()

    def restore(self, tensors: dict[str, Tensor], state: dict) -> tuple[int, int]:
        """Put the run back as the checkpoint left it; returns ``(epoch, minibatch)`` to start from."""
        run = state["run"]
        if run.get("data_sha256") != self.digest:
            raise CheckpointError(f"{self.out}: the data in {self.cfg.data} changed since the checkpoint (or its "
                                  "encoding did: tokenizer, lengths); an exact resume needs the same data")
        try:
            self.load_weights({k: v for k, v in tensors.items()
                               if not k.startswith(("optimizer/", "rng/"))})
            load_optimizer_state(self.opt, "optimizer", tensors, run["optimizer"])
            shard_optimizer_state(self.opt)  # fsdp: each rank keeps the shard of its parameters' moments
            if self.scaler is not None:
                if not isinstance(run.get("grad_scaler"), dict):
                    raise CheckpointError("checkpoint: an fp16 run's checkpoint without the gradient scaler's state")
                self.scaler.load_state_dict(run["grad_scaler"])
            self.g.set_state(tensors["rng/epoch_start"])
            set_rng_state(tensors, run["rng"])
            self.step, self.epoch, self.minibatch = int(state["step"]), int(run["epoch"]), int(run["minibatch"])
            per_epoch = self.total_steps // self.cfg.epochs  # every epoch has as many minibatches (chunks)
            if run.get("total_steps") != self.total_steps or not 0 <= self.epoch < self.cfg.epochs or \
                    not 1 <= self.minibatch <= per_epoch or self.step != self.epoch * per_epoch + self.minibatch:
                raise CheckpointError(f"{self.out}: the checkpoint's place in the run (step {self.step}, epoch "
                                      f"{self.epoch}, minibatch {self.minibatch}, of {run.get('total_steps')} steps) "
                                      f"does not fit its config ({self.cfg.epochs} epochs of {per_epoch} steps): was "
                                      "state.json edited?")
            self.skipped, self.elapsed0, self.extra = int(run["skipped"]), float(run["elapsed"]), dict(run["extra"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.out}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
        self.t0 = time.perf_counter()
        return self.epoch, self.minibatch
