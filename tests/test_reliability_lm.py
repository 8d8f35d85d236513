"""Issue 14, the LM side: every bad input to `proxrl rlhf sft|rm|ppo|train` is one line `error: <field>: …` on
stderr, exit 2, no traceback, before any work (no run directory is made or changed); the run directories of the
LM stages are refused unless --resume/--overwrite; --resume refuses changed options except --updates; local
paths are recorded absolute so that a run resumes from another working directory.

Everything goes through the CLI (`python -m proxrl rlhf …`) in subprocesses, several at a time, on a tiny
random llama (two blocks, byte tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

SRC = str(Path(__file__).resolve().parents[1] / "src")
WALL = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time")
REWARD = "def r(prompts, responses):\n    return [x.count('a') / max(len(x), 1) for x in responses]\n"
TINY_PPO = ["--batch-size", "2", "--num-minibatches", "1", "--micro-batch-size", "2", "--update-epochs", "1",
            "--response-length", "4", "--chat-template", "off", "--lora-r", "2", "--seed", "1"]
TINY_SUP = ["--batch-size", "2", "--micro-batch-size", "2", "--max-response-length", "4", "--chat-template", "off",
            "--lora-r", "2"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from proxrl.lm.tiny import make_tiny

    tmp = tmp_path_factory.mktemp("rel_lm")
    make_tiny(tmp / "model")
    noeos = make_tiny(tmp / "noeos")  # the same model, its tokenizer and configs stripped of EOS
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"):
        f = noeos / name
        if f.is_file():
            d = json.loads(f.read_text())
            d.pop("eos_token", None)
            if "eos_token_id" in d:
                d["eos_token_id"] = None
            f.write_text(json.dumps(d))
    _write_jsonl(tmp / "prompts.jsonl", [{"prompt": "ab" * i} for i in range(1, 7)])
    _write_jsonl(tmp / "prompts2.jsonl", [{"prompt": "ba" * i} for i in range(1, 7)])
    _write_jsonl(tmp / "one_prompt.jsonl", [{"prompt": "ab"}])
    _write_jsonl(tmp / "demos.jsonl", [{"prompt": "ab" * i, "response": "cd"} for i in range(1, 7)])
    _write_jsonl(tmp / "prefs.jsonl", [{"prompt": "ab" * i, "chosen": "aa", "rejected": "bb"} for i in range(1, 5)])
    _write_jsonl(tmp / "one_pair.jsonl", [{"prompt": "ab", "chosen": "aa", "rejected": "bb"}])
    _write_jsonl(tmp / "two_pairs.jsonl", [{"prompt": "ab" * i, "chosen": "aa", "rejected": "bb"} for i in (1, 2)])
    (tmp / "reward.py").write_text(REWARD)
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "B").mkdir()
    return tmp


def _start(cwd: Path, cmd: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "proxrl", "rlhf", cmd, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_all(cwd: Path, jobs: list[tuple[str, list[str]]], width: int = 4) -> list[tuple[int, str]]:
    """Run the CLI commands ``width`` at a time; (exit status, stderr) of each, in order."""
    results: list = [None] * len(jobs)
    for i in range(0, len(jobs), width):
        procs = [(j, _start(cwd, *jobs[j])) for j in range(i, min(i + width, len(jobs)))]
        for j, p in procs:
            _, err = p.communicate(timeout=600)
            results[j] = (p.returncode, err)
    return results


def assert_one_line(result: tuple[int, str], field: str, what: str = "") -> str:
    rc, err = result
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, (what, rc, err[-1500:])
    assert errors[0].startswith(f"error: {field}: "), (what, errors[0])
    return errors[0]


def ppo_args(out: str = "out", prompts: str = "prompts.jsonl", policy: str = "model") -> list[str]:
    return ["--policy", policy, "--prompts", prompts, "--reward", "reward.py:r", "--out", out, *TINY_PPO]


def sup_args(data: str, out: str = "out", model: str = "model") -> list[str]:
    return ["--model", model, "--data", data, "--out", out, *TINY_SUP]


# --------------------------------------------------------------------------- 1. options checked alone
OPTION_CASES = [  # (command, extra options, the field the error names)
    ("ppo", ["--clip-coef", "0"], "clip_coef"),
    ("ppo", ["--clip-coef", "-0.2"], "clip_coef"),
    ("ppo", ["--vf-coef", "-1"], "vf_coef"),
    ("ppo", ["--max-grad-norm", "-1"], "max_grad_norm"),
    ("ppo", ["--vf-clip", "0"], "vf_clip"),
    ("ppo", ["--ent-coef", "-0.01"], "ent_coef"),
    ("ppo", ["--penalty-beta", "-1"], "penalty_beta"),
    ("ppo", ["--penalty-target-kl", "0"], "penalty_target_kl"),
    ("ppo", ["--lora-alpha", "0"], "lora_alpha"),
    ("ppo", ["--lr", "nan"], "lr"),
    ("ppo", ["--lr", "inf"], "lr"),
    ("ppo", ["--samples-per-update", "-1"], "samples_per_update"),
    ("ppo", ["--temperature", "inf"], "temperature"),
    ("ppo", ["--kl-coef", "nan"], "kl_coef"),
    ("ppo", ["--missing-eos-penalty", "inf"], "missing_eos_penalty"),
    ("ppo", ["--target-kl-ref", "inf"], "target_kl_ref"),
    ("train", ["--algo", "grpo", "--clip-coef-high", "inf"], "clip_coef_high"),
    ("sft", ["--lr", "nan"], "lr"),
    ("sft", ["--max-grad-norm", "-1"], "max_grad_norm"),
    ("sft", ["--lora-alpha", "-2"], "lora_alpha"),
    ("rm", ["--lr", "inf"], "lr"),
    ("rm", ["--max-grad-norm", "nan"], "max_grad_norm"),
]


def test_options_checked_alone_one_line(work):
    jobs = []
    for i, (cmd, extra, _) in enumerate(OPTION_CASES):
        out = f"opt{i}"
        base = ppo_args(out) if cmd in ("ppo", "train") else sup_args("demos.jsonl" if cmd == "sft" else "prefs.jsonl", out)
        jobs.append((cmd, base + extra))
    for (cmd, extra, field), res, i in zip(OPTION_CASES, run_all(work, jobs), range(len(jobs))):
        assert_one_line(res, field, f"{cmd} {extra}")
        assert not (work / f"opt{i}").exists()  # refused before any work


# --------------------------------------------------------------------------- 2. against the model and data
def test_options_checked_against_model_and_data(work):
    cases = [
        ("sft", sup_args("demos.jsonl", "md0") + ["--lora-target", "q_proj,nope"], "lora_target", "q_proj"),
        ("sft", sup_args("demos.jsonl", "md1") + ["--finetune", "layers", "--train-layers", "3"], "train_layers",
         "2 transformer blocks"),
        ("rm", sup_args("one_pair.jsonl", "md2"), "data", "at least 2"),
        ("rm", sup_args("two_pairs.jsonl", "md3") + ["--eval-fraction", "0.9"], "eval_fraction", "none for training"),
        ("sft", sup_args("demos.jsonl", "md4", model="noeos"), "model", "no EOS"),
        ("rm", sup_args("prefs.jsonl", "md5", model="noeos"), "model", "no EOS"),
        ("ppo", ppo_args("md6", policy="noeos") + ["--eval-prompts", "1"], "policy", "no EOS"),
        ("ppo", ppo_args("md7", prompts="one_prompt.jsonl"), "eval_prompts", "none of the 1"),
        ("ppo", ppo_args("md8") + ["--eval-prompts", "6"], "eval_prompts", "--eval-prompts 5"),
    ]
    results = run_all(work, [(c, a) for c, a, _, _ in cases])
    for i, ((cmd, args, field, text), res) in enumerate(zip(cases, results)):
        line = assert_one_line(res, field, f"{cmd} {args}")
        assert text in line, line
        assert not (work / f"md{i}").exists()


def test_one_prompt_without_held_out_has_no_nan_in_summary(work):
    rc, err = run_all(work, [("ppo", ppo_args("one", prompts="one_prompt.jsonl") + ["--eval-prompts", "0",
                                                                                  "--updates", "1"])])[0]
    assert rc == 0, err[-2000:]

    def no_nan(token):
        raise AssertionError(f"summary.json holds {token}")

    summary = json.loads((work / "one" / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["reward_before"] is None and summary["reward_after"] is None


# --------------------------------------------------------------------------- 3. SFT sanity
def test_sft_at_a_huge_lr_warns_once(work):
    """float64, lr 1e6: after the first step the logits saturate to a uniform guess with zero gradient; the
    loss stays at ln(259) = 5.557 and the run says so once, naming --lr."""
    rc, err = run_all(work, [("sft", sup_args("demos.jsonl", "huge") + ["--dtype", "float64", "--lr", "1e6",
                                                                        "--epochs", "2"])])[0]
    assert rc == 0, err[-2000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: lr: ") and "--lr" in warnings[0], err[-2000:]


# --------------------------------------------------------------------------- 4. run directories
def test_lm_run_directories_refused_unless_overwrite(work):
    rc, err = run_all(work, [("sft", sup_args("demos.jsonl", "sft_run"))])[0]
    assert rc == 0, err[-2000:]
    assert not [ln for ln in err.splitlines() if ln.startswith("warning:")]  # a healthy run does not warn
    before = {p.name: p.read_bytes() for p in (work / "sft_run").iterdir() if p.is_file()}
    cases = [
        ("sft", sup_args("demos.jsonl", "sft_run"), "out", "already holds a run"),
        ("rm", sup_args("prefs.jsonl", "sft_run"), "out", "already holds a run"),
        ("ppo", ppo_args("sft_run"), "out", "already holds a run"),
        ("train", ppo_args("sft_run") + ["--algo", "pg"], "out", "already holds a run"),
        ("sft", sup_args("demos.jsonl", "a_file"), "out", "is a file"),
        ("ppo", ppo_args("a_file"), "out", "is a file"),
        ("rm", sup_args("prefs.jsonl", "a_file/sub"), "out", "cannot write"),
        ("ppo", ["--resume", "a_file", "--reward", "reward.py:r"], "resume", "is a file"),
        ("ppo", ["--resume", "sft_run", "--overwrite", "--reward", "reward.py:r"], "overwrite", "--resume"),
    ]
    results = run_all(work, [(c, a) for c, a, _, _ in cases])
    for (cmd, args, field, text), res in zip(cases, results):
        line = assert_one_line(res, field, f"{cmd} {args}")
        assert text in line, line
    assert "--resume" not in assert_one_line(results[0], "out")  # sft has no resume: only --overwrite is offered
    assert {p.name: p.read_bytes() for p in (work / "sft_run").iterdir() if p.is_file()} == before
    assert (work / "a_file").read_text() == "not a directory\n"
    rc, err = run_all(work, [("sft", sup_args("demos.jsonl", "sft_run") + ["--overwrite", "--epochs", "2"])])[0]
    assert rc == 0, err[-2000:]
    assert len((work / "sft_run" / "metrics.jsonl").read_text().splitlines()) == 6  # the new run's 2 × 3 steps


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in WALL}
            for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_changes_extends_updates_from_another_directory(work):
    """A run started in A with relative paths, resumed from B: every changed option refused by name with
    the run's files unchanged; --updates raised extends it, deterministically (= a run of 3 updates)."""
    a, b = work, work / "B"
    first = run_all(a, [("ppo", ppo_args("run2") + ["--updates", "2", "--eval-prompts", "2"]),
                        ("ppo", ppo_args("run3") + ["--updates", "3", "--eval-prompts", "2"])], width=2)
    for rc, err in first:
        assert rc == 0, err[-2000:]
    cfg = json.loads((a / "run2" / "config.json").read_text())["config"]
    assert cfg["policy"] == str(a / "model") and cfg["prompts"] == str(a / "prompts.jsonl")
    assert cfg["reward"] == f"{a / 'reward.py'}:r"
    files = {p: p.read_bytes() for p in (a / "run2").rglob("*") if p.is_file()}
    resume = ["--resume", "../run2", "--reward", "../reward.py:r"]
    cases = [
        ("ppo", ["--lr", "1e-3"], "lr"),
        ("ppo", ["--seed", "5"], "seed"),
        ("ppo", ["--temperature", "0.5"], "temperature"),
        ("ppo", ["--prompts", "../prompts2.jsonl"], "prompts"),
        ("ppo", ["--policy", "../noeos"], "policy"),
        ("ppo", ["--finetune", "full"], "finetune"),
        ("ppo", ["--no-adaptive-kl"], "adaptive_kl"),
        ("ppo", ["--eval-prompts=1"], "eval_prompts"),
        ("ppo", ["--out", "../elsewhere"], "out"),
        ("ppo", ["--updates", "1"], "updates"),
        ("train", ["--algo", "grpo"], "algo"),
    ]
    results = run_all(b, [(c, resume + extra) for c, extra, _ in cases])
    for (cmd, extra, field), res in zip(cases, results):
        assert_one_line(res, field, f"{cmd} {extra}")
    assert {p: p.read_bytes() for p in (a / "run2").rglob("*") if p.is_file()} == files
    assert not (work / "elsewhere").exists()
    # same values given again (relative to B) are no change; --updates 3 extends the run
    rc, err = run_all(b, [("ppo", resume + ["--updates", "3", "--policy", "../model", "--batch-size", "2"])])[0]
    assert rc == 0, err[-2000:]
    assert _metrics(a / "run2") == _metrics(a / "run3")
    assert json.loads((a / "run2" / "config.json").read_text())["config"]["updates"] == 3
    assert json.loads((a / "run2" / "summary.json").read_text())["updates"] == 3


def test_a_model_that_is_neither_here_nor_reachable_fails_fast_in_one_line(monkeypatch):
    """No local path, not cached, hub unreachable/offline/unknown: one ConfigError naming 'model', at once
    (transformers alone retried for 51 s before its traceback)."""
    import time

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from proxrl.errors import ConfigError
    from proxrl.lm.loading import check_model_source, load_causal_lm, load_tokenizer

    def unreachable(self, *a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    t = time.perf_counter()
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ConfigError, match="model: 'some-org/no-such-model' is not a local path.*cannot be reached"):
            load("some-org/no-such-model")
    assert time.perf_counter() - t < 10
    with pytest.raises(ConfigError, match="no such file or directory: ./nope/model"):
        check_model_source("./nope/model")
    with pytest.raises(ConfigError, match="not a valid Hugging Face model name"):
        check_model_source("bad name!!")

    class NotFound(RepositoryNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404")

    def missing(self, *a, **k):
        raise NotFound()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ConfigError, match="no such model is on the Hugging Face hub"):
        check_model_source("some-org/no-such-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        check_model_source("some-org/no-such-model")
