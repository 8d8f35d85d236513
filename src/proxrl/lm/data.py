"""Data for the three RLHF stages: JSONL, parquet, or a Hugging Face ``datasets`` directory.

Each stage reads records with these fields (extra fields are allowed and ignored):

=========  ==========================================  =============================================
stage      text records                                chat records (conversational, as TRL's)
=========  ==========================================  =============================================
sft        ``prompt``, ``response`` (or ``completion``)  ``messages`` ending in an assistant turn: that last
                                                       turn is the response (trained); earlier assistant
                                                       turns are prompt (not trained)
rm         ``prompt``, ``chosen``, ``rejected``          ``chosen`` / ``rejected`` conversations sharing
                                                       their turns but the last (the implicit prompt),
                                                       or ``prompt`` turns + one assistant turn each
ppo        ``prompt``                                  ``messages`` or ``prompt`` turns (a trailing
                                                       assistant turn is dropped)
=========  ==========================================  =============================================

A chat prompt becomes a :class:`Conversation`: a ``str`` (its turns as readable text, which is what samples
show and reward functions receive) that keeps its ``messages``; :func:`~proxrl.lm.loading.encode_prompt`
formats those with the tokenizer's chat template. Responses are always the assistant's text.

Sources: a ``.parquet`` file (pyarrow), a directory written by ``datasets.save_to_disk`` (a ``DatasetDict``
uses its ``train`` split), anything else is read as JSON lines. Every problem is a
:class:`~proxrl.errors.DataError` naming ``file:line`` (or ``row``) and the field, one line, no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import DataError

SFT_FIELDS = ("prompt", "response")
RM_FIELDS = ("prompt", "chosen", "rejected")
PPO_FIELDS = ("prompt",)
STAGES = {"sft": SFT_FIELDS, "rm": RM_FIELDS, "ppo": PPO_FIELDS}
ROLES = ("system", "user", "assistant", "tool")
#: what a file that is not JSON lines (CSV, a JSON array) is told
FORMATS = ("the data is read as JSON lines (one object per line), a .parquet file or a datasets.save_to_disk "
           "directory, not CSV or a JSON array (convert with datasets: Dataset.from_csv(f) or Dataset.from_json(f), "
           "then .to_json('data.jsonl'))")


class Conversation(str):
    """A chat prompt: the ``str`` is its turns as readable text; ``messages`` are the turns themselves."""

    messages: list[dict[str, str]]

    def __new__(cls, messages: list[dict[str, str]]):
        if len(messages) == 1 and messages[0]["role"] == "user":
            text = messages[0]["content"]
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        self = super().__new__(cls, text)
        self.messages = [dict(m) for m in messages]
        return self

    def __reduce__(self):  # pickles (gather_objects across ranks) as a Conversation
        return (Conversation, (self.messages,))


def read_records(path: str | os.PathLike, stage: str) -> list[dict]:
    """The records of a data source for ``stage`` ('sft', 'rm' or 'ppo'), each with the stage's string fields
    (chat prompts as :class:`Conversation`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file or dataset directory")
    required = STAGES[stage]
    records = []
    for where, rec in _rows(path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}"
                            + (f"; {FORMATS}" if isinstance(rec, list) else ""))
        # a null field is a missing one: parquet and datasets rows (and datasets' to_json) hold every column of
        # the table, null where a record has no such field, so the same records read the same from every source
        rec = {k: v for k, v in rec.items() if v is not None}
        records.append(_normalise(rec, stage, where))
    if not records:
        raise DataError(f"{path}: no records (expected {', '.join(required)} per record, or chat messages)")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------- sources
def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        yield from _dataset_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        f = open(path, encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not data
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})"
                                    + (f"; {FORMATS}" if lineno == 1 else "")) from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (give JSON lines, a .parquet file or a datasets directory)") from None


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading this data needs the '{module.split('.')[0]}' package: pip install datasets") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    pq = _need("pyarrow.parquet")
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:  # pyarrow's errors: ArrowInvalid, OSError, …
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    for i, rec in enumerate(rows):
        yield f"{path}: row {i}", rec


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()):
        raise DataError(f"{path}: a directory that is not a saved Hugging Face dataset "
                        "(datasets.save_to_disk writes dataset_info.json / dataset_dict.json); give a file instead")
    datasets = _need("datasets")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load the saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {', '.join(ds)}); "
                            "save the split to use with Dataset.save_to_disk")
        ds = ds["train"]
    for i, rec in enumerate(ds):
        yield f"{path}: row {i}", rec


# ---------------------------------------------------------------------------- records
def _normalise(rec: dict, stage: str, where: str) -> dict:
    if stage == "sft":
        if "messages" in rec:
            turns = _turns(rec["messages"], "messages", where)
            if len(turns) < 2 or turns[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages' must end in an assistant turn after at least one other "
                                "turn (the prompt)")
            return {**rec, "prompt": Conversation(turns[:-1]), "response": turns[-1]["content"]}
        if "response" not in rec and "completion" in rec:
            rec = {**rec, "response": rec["completion"]}
        return _text_fields(rec, ("prompt", "response"), where, "each record needs prompt and response, or messages")
    if stage == "rm":
        if isinstance(rec.get("chosen"), list) or isinstance(rec.get("rejected"), list):
            return _chat_pair(rec, where)
        return _text_fields(rec, RM_FIELDS, where, "each record needs prompt, chosen and rejected")
    # ppo
    if "prompt" not in rec and "messages" in rec:
        rec = {**rec, "prompt": rec["messages"]}
    if isinstance(rec.get("prompt"), list):
        turns = _turns(rec["prompt"], "prompt", where)
        while turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns:
            raise DataError(f"{where}: field 'prompt' has no turn before the assistant's")
        return {**rec, "prompt": Conversation(turns)}
    return _text_fields(rec, PPO_FIELDS, where, "each record needs prompt (text or chat turns), or messages")


def _text_fields(rec: dict, names: Sequence[str], where: str, need: str) -> dict:
    for name in names:
        if name not in rec:
            raise DataError(f"{where}: missing field '{name}' ({need})")
        if isinstance(rec[name], list) and name == "prompt":
            rec = {**rec, "prompt": Conversation(_turns(rec[name], name, where))}
        elif not isinstance(rec[name], str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(rec[name]).__name__}")
        else:
            _encodable(rec[name], f"field '{name}'", where)
    return rec


def _encodable(text: str, what: str, where: str) -> None:
    """A text a tokenizer can take: valid Unicode (JSON's "\\ud800" escapes decode to a lone surrogate, which
    has no UTF-8 form and made the tokenizer raise a TypeError at the first rollout)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {what} holds an invalid character at position {e.start} (a lone "
                        "surrogate such as \\ud800: not Unicode text)") from None


def _turns(value: Any, name: str, where: str) -> list[dict[str, str]]:
    """A list of chat turns ``{"role", "content"}`` (strings, a known role), checked."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{name}' turn {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}' turn {i} has role {m['role']!r} (expected one of {', '.join(ROLES)})")
        _encodable(m["content"], f"field '{name}' turn {i}", where)
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def _chat_pair(rec: dict, where: str) -> dict:
    """A conversational preference pair: explicit ``prompt`` turns, or the turns chosen and rejected share."""
    chosen, rejected = (_turns(rec.get(k), k, where) for k in ("chosen", "rejected"))
    if "prompt" in rec:
        prompt = _turns(rec["prompt"], "prompt", where) if isinstance(rec["prompt"], list) else None
        if prompt is None:
            raise DataError(f"{where}: field 'prompt' must be chat turns when chosen/rejected are")
    else:
        prompt, shared = chosen[:-1], rejected[:-1]
        chosen, rejected = chosen[-1:], rejected[-1:]
        if not prompt or prompt != shared:
            raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn but their last (the prompt), "
                            "or give the prompt turns as 'prompt'")
    out = {}
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}' must be one assistant turn after the prompt")
        out[name] = turns[0]["content"]
    return {**rec, "prompt": Conversation(prompt), **out}
