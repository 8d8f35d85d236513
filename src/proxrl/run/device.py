"""The torch device of a run, resolved and checked before any work starts: ``auto`` is CUDA when this torch
can use it, else the CPU; a malformed or unavailable device is one ConfigError line (exit 2 on the CLI)."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(spec: str, field: str = "device") -> str:
    """``auto`` → ``cuda`` or ``cpu``; otherwise the spec itself once torch can use it (``meta`` is accepted:
    it places models without memory, for tests)."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(field, f"not a torch device: {spec!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{spec!r} is not available: this torch cannot use CUDA "
                              f"(torch {torch.__version__}, torch.cuda.is_available() is False)", "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(field, f"{spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible",
                              f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(field, f"{spec!r} is not available on this machine", "use --device cpu or auto")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(field, f"{spec!r} is not available: this torch cannot use an XPU", "use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps", "meta", "xpu"):
        raise ConfigError(field, f"device type {dev.type!r} is not supported", "use auto, cpu, cuda, cuda:N or mps")
    return str(dev)
