"""User-facing errors: the CLI turns these into one line on stderr and exit status 2, never a traceback."""


class ProxrlError(Exception):
    """Base class of errors caused by the user's input (config, data, environment), not by a bug."""


class ConfigError(ProxrlError, ValueError):
    """A config field has a bad value. The message names the field and says how to fix it."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field = field
        msg = f"{field}: {problem}" + (f" ({fix})" if fix else "")
        super().__init__(msg)


class DataError(ProxrlError, ValueError):
    """A data file (JSONL, checkpoint, config.json) is malformed."""


class CheckpointError(ProxrlError):
    """A checkpoint is missing, truncated, or fails validation."""


class NumericsError(ProxrlError, FloatingPointError):
    """NaN or inf appeared in a named quantity during an update."""


def check(cond: bool, field: str, problem: str, fix: str = "") -> None:
    """Validation that survives ``python -O`` (never ``assert``)."""
    if not cond:
        raise ConfigError(field, problem, fix)


def say(line: str) -> None:
    """Write one line to stderr in a single write: processes that share the stream (torchrun's ranks) cannot
    interleave inside it, even when Python's streams are unbuffered (``print`` writes the text and the newline
    separately)."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()
