"""SIGINT/SIGTERM during a run: the update in progress is finished, a checkpoint is written, and the run
stops with :class:`RunInterrupted` (exit status 128 + signal: 130 for SIGINT, 143 for SIGTERM). A second
signal stops at once (KeyboardInterrupt). Used by every stage that checkpoints (gym train, RL on tokens)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional

from ..errors import ProxrlError


class RunInterrupted(ProxrlError):
    """SIGINT/SIGTERM: the current update finished, a checkpoint was written; ``exit_code`` is 130/143 and
    the message names the command that resumes the run."""

    def __init__(self, signum: int, run_dir: Path, update: int, command: str = "proxrl train", extra: str = "",
                 unit: str = "update"):
        self.exit_code, self.command = 128 + signum, command  # the command of the run that stopped
        super().__init__(f"stopped by {signal.Signals(signum).name} after {unit} {update}; checkpoint written; "
                         f"resume with: {command} --resume {run_dir}{extra}")

    def restate(self, message: str) -> "RunInterrupted":
        """The same stop (exit code, command) told by the larger command the run was part of (a ladder, the
        demo), whose own continuation its run's resume command is not."""
        self.args = (message,)
        return self


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run stops where it is (no checkpoint of the update in progress; a checkpoint
    being written is discarded whole). ``exit_code`` is 128 + signal, like :class:`RunInterrupted`."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}; the run resumes from its last "
                         "complete checkpoint with --resume")


class StopSignals:
    """Context manager turning SIGINT/SIGTERM into a flag (``signum``) checked between updates. Installs
    handlers only on the main thread (elsewhere it is a no-op flag) and restores the previous ones."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise StoppedAtOnce(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
