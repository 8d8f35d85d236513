"""Learning curves from ``metrics.jsonl`` files (matplotlib, loaded only here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics.jsonl in this run directory")
    lines = []
    with open(path) as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                raise DataError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            lines.append(row)
    if not lines:
        raise DataError(f"{path}: no metrics lines (the run wrote none yet: nothing to plot)")
    return lines


def curve(rows: list[dict], metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[metric]) for r in rows if r.get(metric) is not None and r.get(x) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, float)
    return a[:, 0], a[:, 1]


def band(curves: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray):
    """Median, min and max over seeds of curves interpolated on a common step grid."""
    ys = [np.interp(grid, x, y, left=np.nan, right=y[-1]) for x, y in curves if len(x)]
    if not ys:
        return None
    ys = np.vstack(ys)
    out = np.full((3, len(grid)), np.nan)
    seen = ~np.isnan(ys).all(0)  # grid points before every seed's first point stay NaN (not drawn), unwarned
    if seen.any():
        out[:, seen] = np.nanmedian(ys[:, seen], 0), np.nanmin(ys[:, seen], 0), np.nanmax(ys[:, seen], 0)
    return out[0], out[1], out[2]


def plot_runs(runs: Sequence[str], out: str, metric: str = "episode_return") -> Path:
    """One figure of ``metric`` against env steps. Checked before anything is drawn: the output's extension
    is an image format matplotlib writes, every run has a non-empty ``metrics.jsonl``, the metric is a key of
    every run's lines and has at least one value; each failure is one line naming the field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out)
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    ext = out_path.suffix[1:].lower()
    if ext not in formats:
        shown = f"extension {out_path.suffix!r}" if ext else "no extension"
        raise ConfigError("out", f"{out} has {shown}, not an image format",
                          "end it in one of " + ", ".join(f".{k}" for k in sorted(formats)))
    if out_path.is_dir():
        raise ConfigError("out", f"{out} is a directory", "give a file name such as curves.png")
    data = []
    for run in runs:
        rows = read_metrics(run)
        keys = set().union(*(r.keys() for r in rows))
        if metric not in keys:
            numeric = sorted(k for k in keys if any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                                    for r in rows))
            raise ConfigError("metric", f"{metric!r} is not in {Path(run) / 'metrics.jsonl'}",
                              "choose one of " + ", ".join(numeric[:30]))
        data.append((run, curve(rows, metric)))
    if not any(len(x) for _, (x, _y) in data):
        raise ConfigError("metric", f"{metric!r} has no values in {'these runs' if len(runs) > 1 else runs[0]} "
                          "(null in every line)", "choose a metric this rung logs")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, (x, y) in data:
        ax.plot(x, y, label=Path(run).name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=120)
    except OSError as e:
        raise ConfigError("out", f"cannot write {out} ({e.strerror or e})", "choose a writable place") from None
    finally:
        plt.close(fig)
    return out_path
