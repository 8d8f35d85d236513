"""The run directory of any stage: ``config.json`` (atomic), ``metrics.jsonl`` (one JSON object per
update or step) and, for the LM stages, ``samples.md``. On resume the files are cut back to what they held
at the checkpoint, so lines written after it by an interrupted run (or a line cut by a kill) disappear."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from . import checkpoint
from ..errors import ConfigError

#: What a run writes into its directory; a directory holding any of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples.md", "summary.json", "tb", ".metrics.jsonl.tmp")


def holds_run(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES[:4])


#: Run directories this process holds: resolved path → [directory fd, number of open RunWriters].
_LOCKS: dict[str, list] = {}


def lock_run(path: str | Path, field: str = "out") -> None:
    """Hold ``path`` (an existing directory) for this process: an exclusive ``flock`` on the directory, kept
    until the last :class:`RunWriter` of it closes (or the process ends), so that a second process writing the
    same run — the same ``--out``, ``--overwrite`` or ``--resume`` of a run still running — is refused in one
    line instead of interleaving its checkpoints and metrics with the first. Reentrant within a process."""
    key = str(Path(path).resolve())
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: unguarded, as before
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(field, f"{path} is in use by another running proxrl process",
                          "wait for that run to end or stop it, or choose another directory") from None
    except OSError:  # a filesystem without locks: unguarded, as before
        os.close(fd)
        return
    _LOCKS[key] = [fd, 0]


def _hold(path: Path) -> None:
    lock_run(path)
    entry = _LOCKS.get(str(path.resolve()))
    if entry is not None:
        entry[1] += 1


def _release(key: str) -> None:
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LOCKS[key]
        os.close(entry[0])  # releases the flock


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


#: The folders of a run that proxrl itself rotates or removes (old checkpoints, ``--overwrite``).
MANAGED_DIRS = ("checkpoints", "tb")


def check_not_inside_run(path: str | Path, field: str = "out") -> None:
    """Refuse a directory inside another run's ``checkpoints/`` or ``tb/`` (or equal to one): that run's
    checkpoint rotation or ``--overwrite`` would delete whatever is written there."""
    path = Path(path).resolve()
    for parent in path.parents:
        rel = path.relative_to(parent)
        if rel.parts[0] in MANAGED_DIRS and any((parent / n).exists() for n in RUN_FILES[:4] if n != rel.parts[0]):
            raise ConfigError(field, f"{path} is inside the run {parent}'s {rel.parts[0]}/, which that run rotates "
                              "and --overwrite removes", "choose a directory outside it")


def check_out(path: str | Path, *, overwrite: bool = False, field: str = "out", command: str = "proxrl train") -> Path:
    """Refuse, before anything is created or removed, an ``out`` that is a file, that lies inside another
    run's checkpoints (:func:`check_not_inside_run`) or that already holds a run (unless ``overwrite``); one
    ConfigError line naming ``field`` and the fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, f"{path} is a file, not a directory", f"give {command} a directory for {_flag(field)}")
    check_not_inside_run(path, field)
    if holds_run(path) and not overwrite:
        raise ConfigError(field, f"{path} already holds a run",
                          f"continue it with --resume {path}, replace it with --overwrite, or choose another "
                          f"{_flag(field)}")
    return path


def check_ladder_out(path: str | Path, command: str) -> None:
    """A ladder's ``--out`` holds its runs in ``<out>/<rung>/seed<k>/``, never a run itself: such an ``--out`` is
    one line saying so (not :func:`check_out`'s offer of --resume or --overwrite, which a ladder has not)."""
    if holds_run(path):
        raise ConfigError("out", f"{path} is itself a run directory, not a ladder's",
                          f"give {command} another --out (its runs go to <out>/<rung>/seed<k>/)")


def prepare_out(path: str | Path, *, overwrite: bool = False, field: str = "out", command: str = "proxrl train",
                extra: tuple[str, ...] = ()) -> Path:
    """Make ``path`` ready for a new run, or refuse with one line naming ``field``: a file, an unwritable
    place, or a directory that already holds a run (unless ``overwrite``: then the old run's files —
    ``RUN_FILES`` and ``extra`` — are removed first; other files are left alone)."""
    path = check_out(path, overwrite=overwrite, field=field, command=command)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(field, f"cannot write to {path} ({e.strerror or e})",
                          f"choose a writable directory for {_flag(field)}") from None
    lock_run(path, field)  # before anything is removed: never the files of a run another process is writing
    path = check_out(path, overwrite=overwrite, field=field, command=command)  # again, now that we hold it
    if holds_run(path):
        for name in RUN_FILES + tuple(extra):
            p = path / name
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            except OSError as e:
                raise ConfigError(field, f"cannot remove the old run's {p} ({e.strerror or e})",
                                  "remove it by hand or choose another directory") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".proxrl-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(field, f"cannot write to {path} ({e.strerror or e})",
                          f"choose a writable directory for {_flag(field)}") from None
    return path


def lm_run_config(stage: str, base_model: str, cfg) -> dict:
    """``config.json`` of an LM stage: the stage, the base model (resolved to an absolute path when it is
    a local one), the run directory's absolute path when it was written (so that paths recorded by a run that
    moved can be found again: :func:`relocate`) and the stage's config dataclass."""
    base = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
    return {"stage": stage, "base_model": base, "run_dir": str(Path(cfg.out).resolve()), "config": asdict(cfg)}


def relocate(recorded: str, old_run: Optional[str], new_run: str | Path) -> str:
    """A local path recorded by a run directory that has since moved (another directory, another machine):
    when ``recorded`` no longer exists, the same place relative to the run — its base model, prompts or
    reward file moved along with it. ``file.py:function`` keeps its function; hub names, module names and
    paths that still exist are returned as they are, as is a path not found at the new place either."""
    if not recorded or not old_run:
        return recorded
    path, suffix = recorded, ""
    head, sep, tail = recorded.rpartition(":")
    if sep and head.endswith(".py"):  # file.py:function
        path, suffix = head, sep + tail
    p = Path(path)
    if not p.is_absolute() or p.exists():
        return recorded
    try:
        rel = os.path.relpath(p, old_run)
    except ValueError:  # another drive
        return recorded
    moved = (Path(new_run).resolve() / rel).resolve()
    return str(moved) + suffix if moved.exists() else recorded


class RunWriter:
    """``config.json``, ``metrics.jsonl`` and ``samples.md`` of one run. ``fsync_each`` fsyncs every
    metrics line (the LM stages, whose updates are seconds long); otherwise lines are flushed and
    :meth:`sync` is called before each checkpoint (the gym loop, thousands of updates a minute)."""

    def __init__(self, out: str | Path, config_obj: Optional[dict], fsync_each: bool = True, samples: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.samples_path = self.out / "samples.md"
        self.fsync_each = fsync_each
        self._f = None
        _hold(self.out)  # refused while another process writes this run; released by close() (or when collected)
        self._unlock = weakref.finalize(self, _release, str(self.out.resolve()))
        if config_obj is None:  # reopened by resume()
            return
        checkpoint.write_json_atomic(self.out / "config.json", config_obj)
        self.metrics_path.write_text("")
        if samples:
            self.samples_path.write_text("# Sample responses\n")

    @classmethod
    def resume(cls, out: str | Path, key: str, last: int, samples_bytes: Optional[int] = None,
               fsync_each: bool = True) -> tuple["RunWriter", list[dict]]:
        """Reopen a run's files cut back to the checkpoint: metrics lines whose ``key`` exceeds ``last``
        (and everything from a malformed line on) are dropped, ``samples.md`` is truncated to
        ``samples_bytes``. Returns the writer and the metrics rows kept."""
        lock_run(out, "resume")  # before the files are cut back: never under a process still writing them
        w = cls(out, None, fsync_each)
        raws, rows = [], []
        if w.metrics_path.is_file():
            for raw in w.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(raw)
                except ValueError:
                    break  # a line cut by the kill
                if not isinstance(row, dict) or not isinstance(row.get(key), int) or row[key] > last:
                    break
                raws.append(raw + "\n")
                rows.append(row)
        have = rows[-1][key] if rows else 0
        if have < last:  # lines the checkpoint covers are gone (a file cut or edited by hand): said, never silently
            print(f"warning: {w.metrics_path} holds {key}s up to {have} but the checkpoint is at {key} {last}: "
                  f"{key}s {have + 1}..{last} have no metrics line (the file was cut or edited)", file=sys.stderr)
        tmp = w.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(raws))
        os.replace(tmp, w.metrics_path)
        if samples_bytes is not None and w.samples_path.is_file() and w.samples_path.stat().st_size > samples_bytes:
            with open(w.samples_path, "r+b") as f:
                f.truncate(samples_bytes)
        return w, rows

    def metrics(self, row: dict) -> None:
        if self._f is None:
            self._f = open(self.metrics_path, "a")
        self._f.write(json.dumps(checkpoint.json_safe(row), allow_nan=False) + "\n")  # strict JSON lines
        self._f.flush()
        if self.fsync_each:
            os.fsync(self._f.fileno())

    def sync(self) -> None:
        """fsync the metrics written so far (before a checkpoint records them as part of the run)."""
        if self._f is not None:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._unlock()

    def samples(self, title: str, items: list[tuple[str, str, float]]) -> int:
        """Append a section; returns the file's size afterwards (fsynced: a checkpoint records it)."""
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(f"\n## {title}\n")
            for prompt, response, reward in items:
                f.write(f"\n**prompt:** {prompt.strip()}\n\n**response** (reward {reward:+.3f}): {response.strip()}\n")
            f.flush()
            os.fsync(f.fileno())
            return f.tell()


class NullWriter:
    """The run files of ranks other than 0 (several processes): nothing is written."""

    samples_path = Path("/nonexistent/samples.md")

    def metrics(self, row: dict) -> None:
        pass

    def samples(self, title, items) -> None:
        return None

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_lm_run(stage: str, cfg, base_model: str, overwrite: bool, log, resumed: Optional[dict] = None):
    """The run files of an epoch-based LM stage (SFT, RM), on any number of processes: the distributed
    context, the writer (rank 0; the old run is removed only now, with ``overwrite``; a run resumed from the
    checkpoint state ``resumed`` has its files cut back to it) and the log (silent on other ranks). Returns
    ``(dist, writer, log)``."""
    from .dist import context

    d = context(cfg.device)
    if not d.main:
        return d, NullWriter(), (lambda *_: None)
    if resumed is not None:
        return d, RunWriter.resume(cfg.out, "step", int(resumed["step"]), resumed["run"].get("samples_bytes"))[0], log
    prepare_out(cfg.out, overwrite=overwrite, command=f"proxrl rlhf {stage}")
    return d, RunWriter(cfg.out, lm_run_config(stage, base_model, cfg)), log


def latest_checkpoint(run_dir: str | Path):
    """``(tensors, state)`` of the latest checkpoint of a run directory (or of a checkpoints folder)."""
    run_dir = Path(run_dir)
    return checkpoint.load(run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir)
