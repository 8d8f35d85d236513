"""Data sources and formats of the RLHF stages: JSONL, parquet, a saved `datasets` directory; text and chat
(`messages`) records for SFT, RM and prompts; every problem one DataError naming where."""

from __future__ import annotations

import json
import os

import pytest

from proxrl.errors import DataError
from proxrl.lm.data import Conversation, read_records, write_jsonl

datasets = pytest.importorskip("datasets")

CHAT_SFT = {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello!"}]}


def test_text_records_from_jsonl_parquet_and_a_saved_dataset_are_the_same(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dir"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    want = read_records(tmp_path / "d.jsonl", "sft")
    assert [r["prompt"] for r in want] == [f"q{i}" for i in range(5)]
    for src in ("d.parquet", "dir", "dict"):
        got = read_records(tmp_path / src, "sft")
        assert [(r["prompt"], r["response"]) for r in got] == [(r["prompt"], r["response"]) for r in want], src


def test_records_with_different_fields_read_the_same_from_every_source(tmp_path):
    """A table (parquet, a datasets directory, datasets' to_json) holds every column in every row, null where a
    record lacks the field: records mixing `response`/`completion`, text/`messages`, `prompt`/`messages` were
    read from JSONL and refused from parquet ("field 'response' must be a string, got NoneType")."""
    pd = pytest.importorskip("pandas")
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    cases = {"sft": [{"prompt": "a", "response": "b"}, {"prompt": "c", "completion": "d"}, {"messages": chat}],
             "ppo": [{"prompt": "x"}, {"messages": chat[:1]}],
             "rm": [{"prompt": "p", "chosen": "a", "rejected": "b", "note": None}, {"prompt": "p", "chosen": "c",
                                                                                     "rejected": "d", "note": "n"}]}
    for stage, rows in cases.items():
        write_jsonl(tmp_path / f"{stage}.jsonl", rows)
        ds = datasets.Dataset.from_pandas(pd.DataFrame(rows))  # every row has every column (from_list: the first's)
        ds.to_parquet(str(tmp_path / f"{stage}.parquet"))
        ds.save_to_disk(str(tmp_path / f"{stage}-dir"))
        ds.to_json(str(tmp_path / f"{stage}-hf.jsonl"))
        fields = STAGE_FIELDS[stage]
        want = [tuple(r[f] for f in fields) for r in read_records(tmp_path / f"{stage}.jsonl", stage)]
        for src in (f"{stage}.parquet", f"{stage}-dir", f"{stage}-hf.jsonl"):
            got = read_records(tmp_path / src, stage)
            assert [tuple(r[f] for f in fields) for r in got] == want, src
            assert [getattr(r["prompt"], "messages", None) for r in got] == \
                [getattr(r["prompt"], "messages", None) for r in read_records(tmp_path / f"{stage}.jsonl", stage)]
    write_jsonl(tmp_path / "null.jsonl", [{"prompt": "a", "response": None}])
    with pytest.raises(DataError, match=r"null.jsonl:1: missing field 'response'"):
        read_records(tmp_path / "null.jsonl", "sft")


STAGE_FIELDS = {"sft": ("prompt", "response"), "ppo": ("prompt",), "rm": ("prompt", "chosen", "rejected")}


def test_csv_and_json_array_files_are_told_what_the_data_is_read_as(tmp_path):
    """A CSV file or a JSON array (Alpaca's format) was refused as 'not valid JSON (Expecting value)' or
    'expected a JSON object, got list' with no word of which formats are read."""
    rows = [{"prompt": "q", "response": "a"}]
    (tmp_path / "d.csv").write_text("prompt,response\nq,a\n")
    (tmp_path / "one.json").write_text(json.dumps(rows))
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2))
    for name, first in (("d.csv", "not valid JSON"), ("one.json", "expected a JSON object, got list"),
                        ("pretty.json", "not valid JSON")):
        with pytest.raises(DataError) as e:
            read_records(tmp_path / name, "sft")
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}:1: {first}") and "\n" not in msg, msg
        assert "read as JSON lines (one object per line), a .parquet file or a datasets.save_to_disk" in msg, msg
    write_jsonl(tmp_path / "d.jsonl", rows + rows)
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text() + "{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON \([^)]*\)$"):  # a later line: no format hint
        read_records(tmp_path / "d.jsonl", "sft")


def test_chat_records_for_each_stage(tmp_path):
    sft = read_records(_jsonl(tmp_path, "sft.jsonl", [CHAT_SFT]), "sft")[0]
    assert isinstance(sft["prompt"], Conversation) and sft["response"] == "hello!"
    assert sft["prompt"].messages == CHAT_SFT["messages"][:2] and sft["prompt"] == "system: be kind\nuser: hi"
    user = [{"role": "user", "content": "rate this"}]
    implicit = {"chosen": user + [{"role": "assistant", "content": "good"}],
                "rejected": user + [{"role": "assistant", "content": "bad"}]}
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}]}
    for rec in (implicit, explicit):
        rm = read_records(_jsonl(tmp_path, "rm.jsonl", [rec]), "rm")[0]
        assert (rm["prompt"], rm["chosen"], rm["rejected"]) == ("rate this", "good", "bad")
        assert rm["prompt"].messages == user
    ppo = read_records(_jsonl(tmp_path, "p.jsonl", [CHAT_SFT, {"prompt": user}, {"prompt": "plain"}]), "ppo")
    assert [p["prompt"] for p in ppo] == ["system: be kind\nuser: hi", "rate this", "plain"]
    assert ppo[0]["prompt"].messages == CHAT_SFT["messages"][:2]  # the trailing assistant turn dropped
    assert not isinstance(ppo[2]["prompt"], Conversation)
    prompts_completion = read_records(_jsonl(tmp_path, "pc.jsonl", [{"prompt": "q", "completion": "a"}]), "sft")[0]
    assert prompts_completion["response"] == "a"


def test_a_conversation_is_formatted_from_its_turns():
    import pickle

    from proxrl.lm.loading import encode_prompt
    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    conv = Conversation(CHAT_SFT["messages"][:2])
    assert tok.decode(encode_prompt(tok, conv, True, 100)) == "<system>be kind<user>hi<assistant>"
    assert tok.decode(encode_prompt(tok, "hi", True, 100)) == "<user>hi<assistant>"
    assert tok.decode(encode_prompt(tok, conv, False, 100)) == "system: be kind\nuser: hi"
    again = pickle.loads(pickle.dumps(conv))
    assert isinstance(again, Conversation) and again.messages == conv.messages and again == conv


@pytest.mark.parametrize("rec,stage,msg", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "sft", "must end in an assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "sft", "has role 'bot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "sft", "turn 0 must be an object"),
    ({"messages": []}, "ppo", "non-empty list"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}]}, "rm",
     "must share every turn but their last"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, "rm",
     "field 'rejected' must be a non-empty list"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "rm", "must be chat turns"),
    ({"prompt": [{"role": "assistant", "content": "hello"}]}, "ppo", "no turn before the assistant"),
    ({"prompt": "bad \ud800 surrogate"}, "ppo", "field 'prompt' holds an invalid character at position 4"),
    ({"prompt": "q", "response": "x\udfff"}, "sft", "field 'response' holds an invalid character"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}]}, "sft",
     "field 'messages' turn 0 holds an invalid character"),
])
def test_malformed_chat_records_name_the_line_and_field(tmp_path, rec, stage, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(rec) + "\n")  # ASCII escapes: a lone surrogate as JSON writes it (\\ud800)
    with pytest.raises(DataError, match=msg) as e:
        read_records(p, stage)
    assert "bad.jsonl:1" in str(e.value)


def test_a_byte_order_mark_is_not_data(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_text('{"prompt": "a"}\r\n{"prompt": "b"}\r\n', encoding="utf-8-sig")
    assert [r["prompt"] for r in read_records(str(p), "ppo")] == ["a", "b"]


def test_a_chat_template_that_refuses_a_prompt_is_one_line():
    from proxrl.errors import ConfigError
    from proxrl.lm.loading import encode_prompt
    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                         "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert tok.decode(encode_prompt(tok, "hi", True, 100)) == "hi"
    with pytest.raises(ConfigError, match=r"^chat_template: the tokenizer's chat template refused a prompt \(System "
                                          r"role not supported\).*--chat-template off"):
        encode_prompt(tok, Conversation(CHAT_SFT["messages"][:2]), True, 100)


def test_a_tokenizer_that_appends_eos_does_not_end_the_prompt():
    """A tokenizer with add_eos_token (a post-processor appending </s>) ended every plain-text prompt with EOS:
    the policy answered after an end of text, and SFT/RM examples had an EOS between prompt and response.
    The appended EOS is dropped (BOS kept); an EOS written in the prompt's text stays."""
    from tokenizers import processors

    from proxrl.lm.loading import encode_prompt
    from proxrl.lm.rm import encode_pairs
    from proxrl.lm.sft_trainer import sft_examples
    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    assert tok("hi")["input_ids"] == [1, 74, 75, 2]
    assert encode_prompt(tok, "hi", False, 100) == [1, 74, 75]
    assert encode_prompt(tok, "hi</s>", False, 100) == [1, 74, 75, 2]
    (ids, loss_mask), = sft_examples(tok, [{"prompt": "hi", "response": "yo"}], False, 100, 10, 2)
    assert ids == [1, 74, 75, 91, 81, 2] and loss_mask == [0, 0, 0, 1, 1, 1]
    (chosen, _), = encode_pairs(tok, [{"prompt": "hi", "chosen": "yo", "rejected": "no"}], False, 100, 10)
    assert chosen == [1, 74, 75, 91, 81, 2]


def test_a_prompt_of_no_token_is_one_line_before_any_work(tmp_path, capsys):
    """A prompt that tokenises to nothing (an empty prompt, a tokenizer without BOS): PPO drew its first
    token from a fully masked position when other prompts shared the batch, and a batch of only such prompts
    (or SFT's greedy samples) was a reshape traceback after the run directory was made. Now one line for
    every stage, before any run directory (the CLI's entry point in-process: the same code as `proxrl`)."""
    from proxrl.cli import main
    from proxrl.lm.tiny import make_tiny

    model = make_tiny(tmp_path / "m")
    prompts = _jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}, {"prompt": ""}, {"prompt": "yo"}, {"prompt": "ok"}])
    sft_data = _jsonl(tmp_path, "s.jsonl", [{"prompt": "", "response": "a"}, {"prompt": "q", "response": "b"}])
    rm_data = _jsonl(tmp_path, "r.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b"}] * 2)
    (tmp_path / "rew.py").write_text("def f(p, r):\n    return [0.0] * len(r)\n")
    cmds = {"ppo": ["ppo", "--policy", str(model), "--prompts", str(prompts), "--reward", f"{tmp_path}/rew.py:f",
                    "--batch-size", "2", "--eval-prompts", "2", "--updates", "1", "--response-length", "4"],
            "sft": ["sft", "--model", str(model), "--data", str(sft_data)],
            "rm": ["rm", "--model", str(model), "--data", str(rm_data)]}
    for stage, args in cmds.items():
        out = tmp_path / f"out_{stage}"
        code = main(["rlhf", *args, "--out", str(out)])
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and "Traceback" not in err, (stage, err[-2000:])
        assert lines == [lines[0]] and lines[0].startswith("error: prompt: '' tokenises to no token"), err
        assert not out.exists()


def test_bad_sources_are_one_line(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a saved Hugging Face dataset"):
        read_records(tmp_path / "plain", "ppo")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_records(tmp_path / "x.parquet", "ppo")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "a"}])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match="without a 'train' split"):
        read_records(tmp_path / "d", "ppo")
    datasets.Dataset.from_list([{"text": "a"}]).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match=r"t.parquet: row 0: missing field 'prompt'"):
        read_records(tmp_path / "t.parquet", "ppo")
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "missing.jsonl", "ppo")


def test_sft_trains_on_chat_messages_from_parquet(tmp_path):
    from proxrl.lm.config import SFTConfig
    from proxrl.lm.sft_trainer import sft
    from proxrl.lm.tiny import make_tiny

    model = make_tiny(tmp_path / "m")
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(8)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    sft(SFTConfig(model=str(model), data=str(tmp_path / "chat.parquet"), out=str(tmp_path / "sft"), epochs=10,
                  batch_size=8, micro_batch_size=4, lr=1e-2, finetune="full"), log=lambda *_: None)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    from proxrl.lm.loading import load_tokenizer
    from proxrl.lm.sft_trainer import sft_examples

    tok = load_tokenizer(str(model))
    (ids, loss_mask), = sft_examples(tok, read_records(tmp_path / "chat.parquet", "sft")[:1], True, 64, 8,
                                     tok.eos_token_id)
    assert tok.decode(ids) == "<user>q0<assistant>ok</s>" and sum(loss_mask) == len("ok") + 1


def test_multi_turn_sft_trains_the_last_assistant_turn_only_as_the_help_says(tmp_path):
    """A multi-turn `messages` record: the loss is on the last assistant turn + EOS, never on the system or
    user turns, the template's assistant header or an earlier assistant turn; the docs did not say which."""
    import subprocess
    import sys

    from proxrl.lm.loading import encode_prompt
    from proxrl.lm.sft_trainer import sft_examples
    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
             {"role": "assistant", "content": "a2"}]
    recs = read_records(_jsonl(tmp_path, "mt.jsonl", [{"messages": turns}]), "sft")
    for chat, text in ((True, "<system>S</s><user>u1</s><assistant>a1</s><user>u2</s><assistant>a2</s>"),
                       (False, "system: S\nuser: u1\nassistant: a1\nuser: u2a2</s>")):
        (ids, mask), = sft_examples(tok, recs, chat, 256, 64, tok.eos_token_id)
        assert tok.decode(ids) == text
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "a2</s>"
        assert mask == [0] * len(encode_prompt(tok, recs[0]["prompt"], chat, 256)) + [1] * 3
    out = subprocess.run([sys.executable, "-m", "proxrl", "rlhf", "sft", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "300"})
    assert "last assistant turn only" in " ".join(out.stdout.split()), out.stdout[-2000:]


def _jsonl(tmp_path, name, rows):
    p = tmp_path / name
    write_jsonl(p, rows)
    return p
