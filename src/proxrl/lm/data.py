"""JSONL data for the three RLHF stages. One record a line; extra fields are allowed and ignored.

=========  ======================================
stage      required string fields
=========  ======================================
sft        ``prompt``, ``response``
rm         ``prompt``, ``chosen``, ``rejected``
ppo        ``prompt``
=========  ======================================

Every problem is a :class:`~proxrl.errors.DataError` naming ``file:line`` and the field, so the CLI
prints one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError

SFT_FIELDS = ("prompt", "response")
RM_FIELDS = ("prompt", "chosen", "rejected")
PPO_FIELDS = ("prompt",)


def read_jsonl(path: str | os.PathLike, required: Sequence[str]) -> list[dict]:
    """Read a JSONL file whose records all carry the ``required`` string fields. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for name in required:
                if name not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{name}' (each line needs {', '.join(required)})")
                if not isinstance(rec[name], str):
                    raise DataError(f"{path}:{lineno}: field '{name}' must be a string, got {type(rec[name]).__name__}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records (expected JSON lines with {', '.join(required)})")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
