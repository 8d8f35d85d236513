"""User-facing errors: the CLI turns these into one line on stderr and exit status 2, never a traceback."""

import typing
from typing import Any, Literal, Union


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


def check_annotated(name: str, tp, value) -> None:
    """``value`` matches the annotation ``tp`` of the config field ``name`` (Literal choices, Optional, int —
    bools are not numbers —, float, bool, str, tuples), else a one-line ConfigError naming the field."""
    if not _matches(tp, value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(name, f"must be {_type_name(tp)}, got {shown} ({type(value).__name__})")


def check_field_types(cfg) -> None:
    """Every field of the dataclass ``cfg`` matches its annotation (:func:`check_annotated`)."""
    import dataclasses

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        check_annotated(f.name, hints[f.name], getattr(cfg, f.name))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or unset (None)"
    if origin is tuple:
        return "a list of " + {int: "integers", str: "strings"}.get(typing.get_args(tp)[0], "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _matches(tp: Any, v: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return isinstance(v, str) and v in typing.get_args(tp)
    if origin is Union:
        return any(_matches(a, v) for a in typing.get_args(tp))
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        return isinstance(v, (tuple, list)) and all(_matches(elem, x) for x in v)  # a list as the message says
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, tp)


def say(line: str) -> None:
    """Write one line to stderr in a single write: processes that share the stream (torchrun's ranks) cannot
    interleave inside it, even when Python's streams are unbuffered (``print`` writes the text and the newline
    separately)."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()
