"""Learning curves from ``metrics.jsonl`` files (matplotlib, loaded only here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError


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
    return np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def plot_runs(runs: Sequence[str], out: str, metric: str = "episode_return") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        x, y = curve(read_metrics(run), metric)
        ax.plot(x, y, label=Path(run).name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
