"""Small helpers shared by the supervised stages (SFT, reward model)."""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import Tensor


def shuffled_chunks(n: int, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """A fresh permutation of ``range(n)`` cut into chunks of ``size`` (the last may be shorter)."""
    yield from torch.randperm(n, generator=generator).split(size)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
