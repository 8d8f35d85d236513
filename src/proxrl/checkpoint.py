"""Checkpoints: tensors in safetensors, everything else in JSON. No pickle on any path.

A checkpoint is a directory ``ckpt-<step>/`` holding ``tensors.safetensors`` and ``state.json``. It is
written under a temporary name, fsynced, then renamed, so a reader sees a complete checkpoint or none;
``latest`` is the highest-numbered complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

TENSORS = "tensors.safetensors"
STATE = "state.json"
_NAME = re.compile(r"^ckpt-(\d{12})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save(root: str | os.PathLike, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/ckpt-<step>`` atomically, then delete all but the newest ``keep`` complete ones."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:012d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-ckpt-"))
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / TENSORS), metadata={"format": "proxrl"})
        with open(tmp / TENSORS, "rb+") as f:
            os.fsync(f.fileno())
        with open(tmp / STATE, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporaries are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)
             and (p / TENSORS).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: str | os.PathLike) -> Path:
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise CheckpointError(f"no checkpoint found in {root}")
    return ckpts[-1]


def load(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load one checkpoint directory (or the latest under a run's ``checkpoints/``). Raises
    :class:`CheckpointError` with one line for anything malformed; never unpickles."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / TENSORS).is_file():
        path = latest(path)
    try:
        tensors = load_file(str(path / TENSORS), device=device)
    except Exception as e:  # safetensors raises its own SafetensorError (not exported under a stable name)
        raise CheckpointError(f"{path / TENSORS}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
    try:
        with open(path / STATE) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE}: expected a JSON object, got {type(state).__name__}")
    return tensors, state
