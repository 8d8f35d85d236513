"""Checkpoints: tensors in safetensors, everything else in JSON. No pickle on any path.

A checkpoint is a directory ``ckpt-<step>/`` holding ``tensors.safetensors`` and ``state.json``. It is
written under a temporary name, fsynced, then renamed, so a reader sees a complete checkpoint or none;
``latest`` is the highest-numbered complete one. Rotation deletes old checkpoints only after the new one
is complete, and never the one just written. Loading checks the safetensors header (size, JSON, offsets)
before reading the tensors and validates ``state.json`` against the schema of its format; anything
malformed is a one-line :class:`~proxrl.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError

TENSORS = "tensors.safetensors"
STATE = "state.json"
_NAME = re.compile(r"^ckpt-(\d{12})$")
_OLD = re.compile(r"^\.old-(ckpt-\d{12})$")  # a checkpoint being replaced by one of the same step

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit is 100 MB too
MAX_STATE_BYTES = 64 * 1024 * 1024
GYM_FORMAT = "proxrl.gym/1"
LM_STAGES = ("sft", "rm", "ppo")
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(fd_or_path, mode: int) -> None:
    """``mkstemp``/``mkdtemp`` create 0600/0700 temporaries; the renamed result gets the mode an ordinary
    ``open``/``mkdir`` would have given it (0666/0777 less the umask), like every other file of a run."""
    mode &= ~_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def json_safe(obj: Any) -> Any:
    """JSON has no NaN or infinity: a statistic that does not exist (0/0, no held-out prompts) is null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats written as null), atomically: a temporary file, fsync, rename."""
    obj = json_safe(obj)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _follow_umask(fd, 0o666)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def save(root: str | os.PathLike, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/ckpt-<step>`` atomically, then delete all but the newest ``keep`` complete ones (never the
    one just written, and nothing before it is complete)."""
    from safetensors.torch import save_file

    root = Path(root)
    final = root / f"ckpt-{step:012d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-ckpt-"))
    except OSError as e:
        raise _not_written(final, e) from None
    try:
        _follow_umask(tmp, 0o777)
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / TENSORS), metadata={"format": "proxrl", "sha256": tensors_digest(contiguous)})
        _follow_umask(tmp / TENSORS, 0o666)  # safetensors writes it 0600
        with open(tmp / TENSORS, "rb+") as f:
            os.fsync(f.fileno())
        with open(tmp / STATE, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Same step written again: move the old one aside first (list_checkpoints still finds it under
            # that name if we die before the new one is in place), then put the new one in, then delete it.
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            _fsync_dir(root)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # disk full, read-only, I/O error
            raise _not_written(final, e) from None
        raise
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            if stale.name != final.name:
                shutil.rmtree(stale, ignore_errors=True)
    for junk in root.iterdir():  # temporaries of saves that were killed
        if junk.name.startswith(".tmp-ckpt-") and junk != tmp:
            shutil.rmtree(junk, ignore_errors=True)
    return final


def _not_written(final: Path, e: BaseException) -> CheckpointError:
    """A checkpoint that could not be written (disk full, read-only, I/O error): one line saying that nothing of
    it was kept and that the complete checkpoints before it are untouched."""
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e)
              else type(e).__name__)
    return CheckpointError(f"{final}: cannot write this checkpoint ({reason}); nothing of it was kept and the "
                           "checkpoints before it are intact (free disk space or make it writable, then resume the run)")


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: written into the safetensors
    header at save and checked at load, so that a flipped bit in the data (which the header checks cannot see)
    is one error line instead of a silently different resume."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporaries are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[str, Path] = {}
    for p in root.iterdir():
        m = _NAME.match(p.name) or _OLD.match(p.name)
        if m and p.is_dir() and (p / TENSORS).is_file() and (p / STATE).is_file():
            name = p.name if _NAME.match(p.name) else m.group(1)
            if name not in found or _NAME.match(p.name):  # the plain name wins over a stale .old- copy
                found[name] = p
    return [found[k] for k in sorted(found)]


def latest(root: str | os.PathLike) -> Path:
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise CheckpointError(f"{root}: no checkpoint found (expected ckpt-<step>/ with {TENSORS} and {STATE})")
    return ckpts[-1]


# ----------------------------------------------------------------------------------------- validation
def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a safetensors file's header without reading its data: an 8-byte little-endian header length
    within the file and ≤ :data:`MAX_HEADER_BYTES`, a JSON object header, every tensor's dtype, shape and
    byte range consistent with the file. Returns the header. Raises a one-line CheckpointError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", head)
            # a pickle (0x80) or zip (PK) signature, judged only when the 8 bytes are no plausible header
            # length: a valid file's length can start with 0x80 too (e.g. a 1152-byte header)
            if (n > MAX_HEADER_BYTES or n > size - 8) and (head[:2] == b"PK" or head[:1] == b"\x80"):
                raise CheckpointError(f"{path}: not a safetensors file (looks like a torch.save/pickle file; "
                                      "proxrl never unpickles — convert it to safetensors)")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the "
                                      f"{MAX_HEADER_BYTES} byte limit)")
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.lstrip(b" ").startswith(b"{"):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not valid JSON; truncated?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if not (0 <= begin <= end <= data_len) or end - begin != numel * _DTYPE_BYTES[info["dtype"]]:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong byte size "
                                  f"(truncated?)")
    return header


def _type_error(path: Path, key: str, want: str, got: Any) -> CheckpointError:
    shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
    return CheckpointError(f"{path}: '{key}' must be {want}, got {shown} ({type(got).__name__})")


def _int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def validate_state(state: Any, path: str | os.PathLike = STATE) -> dict[str, Any]:
    """Check ``state.json`` against the schema of its format; returns it or raises a one-line CheckpointError.

    * gym (``format`` = ``proxrl.gym/1``): ``update``, ``step`` integers ≥ 0; ``config`` an object whose
      fields are TrainConfig fields of the right types; ``policy`` an object with ``kind`` (discrete,
      multidiscrete, continuous), ``obs_dim`` and ``act_dim`` integers ≥ 1, ``nvec`` a list of integers ≥ 1,
      ``critic`` a boolean. Other keys (resume state) are left to their reader.
    * language models (``stage`` = sft, rm or ppo): ``step`` an integer ≥ 0 when present.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    if "format" in state:
        if state["format"] != GYM_FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {str(state['format'])[:40]!r} "
                                  f"(this proxrl reads {GYM_FORMAT})")
        for key in ("update", "step", "config", "policy"):
            if key not in state:
                raise CheckpointError(f"{path}: missing key '{key}' of the {GYM_FORMAT} format")
        for key in ("update", "step"):
            if not _int(state[key]):
                raise _type_error(path, key, "an integer ≥ 0", state[key])
        cfg = state["config"]
        if not isinstance(cfg, dict):
            raise _type_error(path, "config", "an object", cfg)
        from ..gym.config import FIELD_NAMES, check_type

        for name, value in cfg.items():
            if name not in FIELD_NAMES:
                raise CheckpointError(f"{path}: 'config.{str(name)[:40]}' is not a TrainConfig field")
            if name == "hidden" and isinstance(value, list):
                value = tuple(value)
            try:
                check_type(name, value)
            except ConfigError as e:
                raise CheckpointError(f"{path}: config.{e}") from None
        pol = state["policy"]
        if not isinstance(pol, dict):
            raise _type_error(path, "policy", "an object", pol)
        for key in ("kind", "obs_dim", "act_dim", "nvec", "critic"):
            if key not in pol:
                raise CheckpointError(f"{path}: missing key 'policy.{key}'")
        if pol["kind"] not in ("discrete", "multidiscrete", "continuous"):
            raise _type_error(path, "policy.kind", "discrete, multidiscrete or continuous", pol["kind"])
        for key in ("obs_dim", "act_dim"):
            if not _int(pol[key], 1):
                raise _type_error(path, f"policy.{key}", "an integer ≥ 1", pol[key])
        if not isinstance(pol["nvec"], list) or not all(_int(n, 1) for n in pol["nvec"]):
            raise _type_error(path, "policy.nvec", "a list of integers ≥ 1", pol["nvec"])
        if not isinstance(pol["critic"], bool):
            raise _type_error(path, "policy.critic", "true or false", pol["critic"])
    elif "stage" in state:
        if state["stage"] not in LM_STAGES:
            raise _type_error(path, "stage", "one of " + ", ".join(LM_STAGES), state["stage"])
        if "step" in state and not _int(state["step"]):
            raise _type_error(path, "step", "an integer ≥ 0", state["step"])
    else:
        raise CheckpointError(f"{path}: not a proxrl checkpoint state (no 'format' or 'stage' key)")
    return state


def read_json(path: str | os.PathLike, max_bytes: int = MAX_STATE_BYTES) -> Any:
    """A JSON file, size-capped, with one-line CheckpointErrors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size} bytes exceeds the {max_bytes} byte limit for a JSON file")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except ValueError as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not valid JSON ({msg}; truncated?)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None


def load(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load one checkpoint directory (or the latest under a run's ``checkpoints/``). Raises
    :class:`CheckpointError` with one line for anything malformed; never unpickles."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / TENSORS).is_file():
        path = latest(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path / STATE}: missing")
    state = validate_state(read_json(path / STATE), path / STATE)
    header = check_safetensors(path / TENSORS)
    try:
        tensors = load_file(str(path / TENSORS), device=device)
    except Exception as e:  # safetensors raises its own SafetensorError (not exported under a stable name)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path / TENSORS}: not a valid safetensors file ({first})") from None
    meta = header.get("__metadata__")
    want = meta.get("sha256") if isinstance(meta, dict) else None  # absent in checkpoints written before it
    if want is not None and tensors_digest(tensors) != want:
        raise CheckpointError(f"{path / TENSORS}: its data does not match the checksum written with it (a corrupted "
                              f"file); an earlier checkpoint, if one is kept, resumes once {path.name} is removed")
    return tensors, state
