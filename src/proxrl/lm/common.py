"""Small helpers shared by the LM stages (SFT, reward model, PPO)."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import time



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


def scaler_summary(res, scaler) -> dict:
    """The summary fields of a stage under the fp16 gradient scaler (steps it skipped, the final scale);
    ``res`` is the :class:`~proxrl.run.sgd.SGDResult`. Empty without a scaler."""
    return {} if scaler is None else {"steps_skipped": res.steps_skipped, "loss_scale": scaler.get_scale()}


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


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
