"""Console progress of every stage, always on **stderr** (stdout carries only results): a rich bar on a
terminal, otherwise (a pipe, nohup, CI) one plain line every ~5 % of the run with the ETA; nothing with
``mode='off'``. And TensorBoard scalars, when asked for."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError


def clock(seconds: float) -> str:
    """Seconds as m:ss (h:mm:ss from an hour on): the elapsed and ETA figures of every progress line."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``Progress(total, label, info, mode)``; ``update(line)`` once per update; ``close()`` at the end.
    ``info(line) -> str`` formats the metrics shown next to the bar. ``mode``: 'auto' (a bar on a
    terminal, plain lines otherwise), 'on' (a bar), 'plain', 'off'."""

    def __init__(self, total: int, label: str, info: Callable[[dict], str], mode: str = "auto", done: int = 0,
                 stream=None):
        self.total, self.label, self.info, self.done = max(total, 1), label, info, done
        self.stream = stream if stream is not None else sys.stderr
        self.t0, self.start_done = time.perf_counter(), done
        self.next_plain = 0.0
        self.bar = None
        if mode == "auto":
            mode = "on" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        if mode == "on":
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn(label), BarColumn(), TextColumn("{task.fields[info]}"),
                                    TimeRemainingColumn(), transient=False, console=Console(file=self.stream))
            self.task = self.bar.add_task("run", total=self.total, completed=done, info="")
            self.bar.start()

    def eta(self) -> float:
        rate = (time.perf_counter() - self.t0) / max(self.done - self.start_done, 1)
        return rate * (self.total - self.done)

    def update(self, line: dict) -> None:
        self.done += 1
        if self.mode == "off":
            return
        text = self.info(line)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=text)
            return
        frac = self.done / self.total
        if frac + 1e-9 >= self.next_plain or self.done == self.total:
            self.next_plain = frac + 0.05
            print(f"{self.label} {self.done}/{self.total} ({100 * frac:3.0f}%)  {text}  "
                  f"elapsed {clock(time.perf_counter() - self.t0)}  eta {clock(self.eta())}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class TensorBoard:
    """Numeric fields of each metrics line as TensorBoard scalars under ``run_dir/tb`` (``x`` = the step)."""

    def __init__(self, run_dir: Path):
        tensorboard_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, line: dict, x: int) -> None:
        for k, v in line.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, x)

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> None:
    """One ConfigError line when TensorBoard's writer cannot be imported (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("tensorboard", "TensorBoard is not installed", "pip install tensorboard") from None


def tensorboard(run_dir: Path, enabled: bool) -> Optional[TensorBoard]:
    return TensorBoard(run_dir) if enabled else None
