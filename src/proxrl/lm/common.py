"""Small helpers shared by the LM stages (SFT, reward model, PPO)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import sys
from typing import Optional, Sequence



def step_fields(grad_norm: float, scaler) -> tuple[dict, str]:
    """What one SFT/RM metrics line and log line say of an optimizer step: ``grad_norm`` (None for a step the
    fp16 gradient scaler skipped: :func:`proxrl.run.sgd.sgd_epochs` reports it as NaN), ``skipped`` (0/1) and,
    with a scaler, ``loss_scale``; and the log line's suffix for a skipped step ('' otherwise)."""
    skipped = not math.isfinite(grad_norm)
    fields = {"grad_norm": None if skipped else grad_norm, "skipped": int(skipped)}
    if scaler is not None:
        fields["loss_scale"] = scaler.get_scale()
    suffix = f"  SKIPPED: fp16 gradients overflowed, loss scale now {scaler.get_scale():g}" if skipped else ""
    return fields, suffix


def scaler_summary(steps_skipped: int, scaler) -> dict:
    """The summary fields of a stage under the fp16 gradient scaler (the optimizer steps it skipped over the
    whole run, the final scale). Empty without a scaler."""
    return {} if scaler is None else {"steps_skipped": steps_skipped, "loss_scale": scaler.get_scale()}


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc to serve every allocation from its heap and never hand freed memory back to the OS
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2³¹−1)``); once per process, before the models
    are loaded.

    Why: an LM step allocates and frees tensors larger than glibc's largest mmap threshold (32 MB) many
    times — log-softmax, exp and their gradients over the vocabulary, the gradient of a tied embedding —
    and glibc serves each one with a fresh ``mmap`` whose pages then fault in one by one and go back to the
    OS on free. Kept in the heap, they are reused without a fault. Measured on SmolLM2-135M, 2 CPU cores,
    one PPO step of batch 16: 9.0 → 6.8 s with all weights trained, 7.3 → 6.2 s with LoRA.
    Cost: the process keeps its peak heap (its resident size does not shrink after a peak). Linux/glibc
    only (elsewhere nothing happens); ``PROXRL_KEEP_FREED_MEMORY=0`` turns it off. Returns whether it is on."""
    if not sys.platform.startswith("linux") or os.environ.get("PROXRL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no such symbol)
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# ---------------------------------------------------------------------------- checkpointed SFT / RM runs
#: options ``--resume`` of an SFT or reward-model run lets differ from the saved run (the process layout, where
#: the run is, how often / how many checkpoints are written: none changes what the run computes)
STAGE_RESUME_MAY_CHANGE = ("resume", "out", "parallel", "overwrite", "checkpoint_every", "keep_checkpoints")


def begin_stage(cfg, stage: str, explicit=None):
    """Before any work of an SFT (``stage`` 'sft') or reward-model ('rm') run: ``(config, resumed, overwrite)``.

    With ``cfg.resume`` (or in a worker restarted by torchrun whose run already wrote a checkpoint) the
    config is the saved run's and ``resumed`` its latest checkpoint ``(tensors, state)``, which must be an
    unfinished one of ``stage`` (:mod:`proxrl.run.resumable`); an option in ``explicit`` (the options given;
    None: every field away from its default) that differs from the saved run is a one-line ConfigError.
    Otherwise ``resumed`` is None and ``--out`` is checked for a new run."""
    from pathlib import Path

    from ..errors import CheckpointError
    from ..run import checkpoint
    from .config import check_new_out, restarted_by_torchrun

    restarted = not cfg.resume and restarted_by_torchrun() and cfg.out and \
        checkpoint.list_checkpoints(Path(cfg.out) / "checkpoints")
    if restarted:  # torchrun --max-restarts: continue by itself — only its own run, whose config is the one given
        cfg.validate()  # (not a run --out held before its first attempt failed, e.g. refused as "already holds a run")
        cfg, explicit = dataclasses.replace(cfg, resume=cfg.out, overwrite=False), [f.name for f in dataclasses.fields(cfg)]
    if not cfg.resume:
        cfg.validate()
        return cfg, None, check_new_out(cfg.out, cfg.overwrite, stage, cfg)
    run_dir, tensors, state = open_resume(cfg, stage)
    saved = state.get("config")
    if state.get("stage") != stage:
        raise CheckpointError(f"{run_dir}: not a checkpoint of `proxrl rlhf {stage}` (stage {state.get('stage')!r})")
    if state.get("complete") is not False:
        raise CheckpointError(f"{run_dir}: the {stage} run is finished (step {state.get('step')}); nothing to resume "
                              "(start a new run with another --out)")
    if not isinstance(saved, dict) or not isinstance(state.get("run"), dict):
        raise CheckpointError(f"{run_dir}: the checkpoint has no run state to resume from (was it edited?)")
    cls = type(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise CheckpointError(f"{run_dir}: checkpoint config has unknown fields {unknown[:3]}")
    relocate_saved(saved, run_dir, ("model", "data"))
    had = cls(**{**saved, "resume": None, "out": str(run_dir), "overwrite": False})
    if explicit is None:
        default = cls()
        explicit = [n for n in fields if getattr(cfg, n) != getattr(default, n)]
    check_resume_options(cfg, had, run_dir, explicit, STAGE_RESUME_MAY_CHANGE, ("model", "data"),
                         "start a new run with another --out to change it", stage if restarted else None)
    had.validate()
    return had, (tensors, state), False


def open_resume(cfg, command: str):
    """``(run_dir, tensors, state)``: the run directory of ``cfg.resume`` and its latest checkpoint, with one
    line for a file given as the run, or ``--overwrite`` given with ``--resume``."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..run.rundir import latest_checkpoint

    run_dir = Path(cfg.resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("resume", f"{run_dir} is a file, not a run directory",
                          f"give the directory `proxrl rlhf {command} --out` wrote")
    if cfg.overwrite:
        raise ConfigError("overwrite", "cannot be combined with --resume", "drop one of the two")
    return (run_dir, *latest_checkpoint(run_dir))


def relocate_saved(saved: dict, run_dir, names: Sequence[str]) -> None:
    """The local paths ``names`` of a checkpoint's config (``saved``, changed in place) found again at the same
    place relative to the run when the run directory has moved (:func:`proxrl.run.rundir.relocate`)."""
    from ..errors import CheckpointError
    from ..run.rundir import relocate
    from .loading import read_run_config

    try:
        moved_from = (read_run_config(run_dir) or {}).get("run_dir")  # the run was written there
    except CheckpointError:  # config.json edited: the checkpoint holds the config; only moving the run needs it
        moved_from = None
    for name in names:  # moved together with the run: found at the same relative place
        if isinstance(saved.get(name), str):
            saved[name] = relocate(saved[name], moved_from, run_dir)


def check_resume_options(cfg, had, run_dir, explicit, may_change: Sequence[str], path_fields: Sequence[str],
                         fix: str, restarted_stage: Optional[str] = None) -> None:
    """The options of a ``--resume`` (``cfg``) against the saved run's config (``had``, updated in place): an
    option in ``explicit`` that differs from the saved value is one ConfigError line (``fix`` its remedy; for a
    worker restarted by torchrun, ``restarted_stage``, the line says it continues only its own run), except
    those in ``may_change``; of these, the process layout and the checkpoint cadence are taken from ``cfg``.
    ``path_fields`` are compared as absolute paths, ``device`` as the device 'auto' resolves to."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..run.device import resolve_device
    from .config import absolute_path

    fields = {f.name for f in dataclasses.fields(type(cfg))}
    for name in sorted(set(explicit)):
        if name == "out":
            if Path(cfg.out).resolve() != Path(run_dir).resolve():
                raise ConfigError("out", f"--resume continues the run in {run_dir}; --out {cfg.out} names another "
                                  "directory", "drop --out (the run stays where it is)")
            continue
        if name in may_change or name not in fields:
            continue
        given, was = getattr(cfg, name), getattr(had, name)
        if name in path_fields:
            given = absolute_path(given)
        elif name == "device":  # the run recorded the device 'auto' chose
            given = resolve_device(given)
        if given != was and restarted_stage:
            raise ConfigError(name, f"{run_dir} holds a run with {name} = {was!r}, not this command's {given!r}; a "
                              "worker restarted by torchrun continues only its own run", "choose another --out, or "
                              f"continue that run with: proxrl rlhf {restarted_stage} --resume {run_dir}")
        if given != was:
            raise ConfigError(name, f"--resume continues the run with its saved config ({name} = {was!r}); it cannot "
                              f"change to {given!r}", fix)
    for name in ("parallel", "checkpoint_every", "keep_checkpoints"):
        if name in explicit and name in fields:
            setattr(had, name, getattr(cfg, name))
