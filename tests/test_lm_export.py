"""`proxrl export RUN --out DIR` writes a standard Hugging Face model directory that loads without proxrl:
merged LoRA weights give the trained policy's logits exactly; `--adapter` writes a peft adapter that gives
them on the base model; bad inputs are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "proxrl", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import ppo
    from proxrl.lm.tiny import make_tiny

    tmp = tmp_path_factory.mktemp("export")
    model = make_tiny(tmp / "base", seed=0)
    write_jsonl(tmp / "p.jsonl", [{"prompt": f"p {i}"} for i in range(6)])
    cfg = PPOConfig(policy=str(model), prompts=str(tmp / "p.jsonl"), out=str(tmp / "run"), updates=2, batch_size=4,
                    num_minibatches=2, micro_batch_size=2, response_length=4, eval_prompts=1, lr=3e-2,
                    chat_template="off", lora_r=2, reward="x:y")
    ppo(cfg, reward=lambda p, r: [len(x) / 4 for x in r], log=lambda *_: None)
    # the trained policy's logits, from proxrl itself
    tr = PPOTrainer(PPOConfig(**{**cfg.__dict__, "policy": str(tmp / "run"), "finetune": "full", "out": "x"}),
                    reward=lambda p, r: [0.0] * len(r))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = tr.policy.lm(input_ids=ids).logits
    return tmp, ids, want


def test_export_merged_loads_with_plain_transformers(trained):
    tmp, ids, want = trained
    p = _cli("export", str(tmp / "run"), "--out", str(tmp / "merged"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == "merged model"
    assert not list((tmp / "merged").glob("*.bin"))  # safetensors only
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp / 'merged')!r}); "
            f"AutoTokenizer.from_pretrained({str(tmp / 'merged')!r}); "
            "print(m(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits.flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # no proxrl needed
    assert out.returncode == 0, out.stderr
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, want.flatten(), atol=1e-5)


def test_export_adapter_loads_with_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, ids, want = trained
    p = _cli("export", str(tmp / "run"), "--out", str(tmp / "adapter"), "--adapter")
    assert p.returncode == 0, p.stderr
    base = AutoModelForCausalLM.from_pretrained(str(tmp / "base"))
    m = PeftModel.from_pretrained(base, str(tmp / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, want, atol=1e-5)
    # --dtype bfloat16: the adapter itself in bf16 (peft kept it in float32: rounded, yet no smaller)
    from safetensors.torch import load_file

    p = _cli("export", str(tmp / "run"), "--out", str(tmp / "adapter-bf16"), "--adapter", "--dtype", "bfloat16")
    assert p.returncode == 0, p.stderr
    w = load_file(str(tmp / "adapter-bf16" / "adapter_model.safetensors"))
    assert w and {t.dtype for t in w.values()} == {torch.bfloat16}


def test_an_added_pad_token_exports_the_same_model_every_time(tmp_path):
    """A tokenizer whose pad is its EOS (and no unk/bos) gets proxrl's own pad token and a grown embedding.
    The new row is the mean of the others — not a draw of the global RNG, which made every load of a LoRA run
    (whose checkpoint holds only the adapter) and so every export differ in the pad token's logit. The
    adapter export loads on the base resized as its result says, with the merged export's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxrl.lm import sft
    from proxrl.lm.config import SFTConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.export import ExportConfig, export
    from proxrl.lm.tiny import make_tiny

    base = make_tiny(tmp_path / "base", seed=0)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token, tok.bos_token, tok.unk_token = tok.eos_token, None, None
    tok.save_pretrained(base)
    n_base = len(tok)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "ok"} for i in range(4)])
    sft(SFTConfig(model=str(base), data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "run"), batch_size=2,
                  micro_batch_size=2, lora_r=2, chat_template="off"), log=lambda *_: None)
    for d in ("a", "b"):
        torch.manual_seed({"a": 1, "b": 2}[d])  # whatever the global RNG holds
        export(ExportConfig(run=str(tmp_path / "run"), out=str(tmp_path / d)))
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    emb = wa["model.embed_tokens.weight"]
    assert emb.shape[0] == n_base + 1 and torch.equal(emb[-1], emb[:-1].mean(0))
    res = export(ExportConfig(run=str(tmp_path / "run"), out=str(tmp_path / "adapter"), adapter=True))
    assert f"resize_token_embeddings({n_base + 1})" in res["load"]
    plain = AutoModelForCausalLM.from_pretrained(base)
    plain.resize_token_embeddings(n_base + 1)
    m = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    ids = torch.tensor([[5, 6, 7, n_base]])  # the pad token's row too
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)


EDITED = {"config.json without config": lambda c: c.pop("config"), "config a list": lambda c: c.update(config=[1]),
          "config.json without base_model": lambda c: c.pop("base_model"), "run_dir a list": lambda c: c.update(run_dir=[1])}


@pytest.mark.parametrize("case", ["not a run", "out not empty", "adapter of a full run", *EDITED,
                                  "killed before its first checkpoint", "out inside the run's checkpoints"])
def test_export_bad_input_is_one_line(trained, case):
    import shutil

    tmp, _, _ = trained
    if case in EDITED:  # a run directory's config.json edited by hand: one line, not a KeyError/AttributeError
        shutil.copytree(tmp / "run", tmp / "edited", dirs_exist_ok=True)
        c = json.loads((tmp / "run" / "config.json").read_text())
        EDITED[case](c)
        (tmp / "edited" / "config.json").write_text(json.dumps(c))
    if case == "killed before its first checkpoint":
        (tmp / "early").mkdir(exist_ok=True)
        shutil.copy(tmp / "run" / "config.json", tmp / "early" / "config.json")
    (tmp / "full").mkdir(exist_ok=True)
    (tmp / "full" / "config.json").write_text(json.dumps({"stage": "sft", "base_model": "x", "config": {"finetune": "full"}}))
    (tmp / "busy").mkdir(exist_ok=True)
    (tmp / "busy" / "f").write_text("x")
    args = {"not a run": [str(tmp), "--out", str(tmp / "o1")],
            "out not empty": [str(tmp / "run"), "--out", str(tmp / "busy")],
            "adapter of a full run": [str(tmp / "full"), "--out", str(tmp / "o2"), "--adapter"],
            **{k: [str(tmp / "edited"), "--out", str(tmp / "o3")] for k in EDITED},
            "killed before its first checkpoint": [str(tmp / "early"), "--out", str(tmp / "o4")],
            "out inside the run's checkpoints": [str(tmp / "run"), "--out", str(tmp / "run" / "checkpoints" / "x")]}[case]
    p = _cli("export", *args)
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("Loading weights")]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not (tmp / "o3").exists() and not (tmp / "o4").exists() and not (tmp / "run" / "checkpoints" / "x").exists()


def test_a_run_moved_with_its_models_still_resumes_and_exports(tmp_path, monkeypatch, capsys):
    """A project folder (base model, prompts, reward file, an SFT run and a PPO run on it) moved elsewhere: the
    paths each run recorded are found again at the same place relative to it — the PPO run resumes and both
    export; a base model that did not move along is one line naming it."""
    import shutil

    from proxrl.cli import main
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.tiny import make_tiny

    old = tmp_path / "project"
    make_tiny(old / "model")
    write_jsonl(old / "demos.jsonl", [{"prompt": f"q{i}", "response": "ab"} for i in range(6)])
    write_jsonl(old / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(8)])
    (old / "r.py").write_text("def f(p, r):\n    return [len(x) / 10 for x in r]\n")
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--response-length", "4", "--eval-prompts", "2"]
    assert main(["rlhf", "sft", "--model", str(old / "model"), "--data", str(old / "demos.jsonl"), "--out",
                 str(old / "sft"), "--epochs", "1", "--batch-size", "3", "--micro-batch-size", "3"]) == 0
    assert main(["rlhf", "ppo", "--policy", str(old / "sft"), "--reward", f"{old / 'r.py'}:f", "--prompts",
                 str(old / "p.jsonl"), "--out", str(old / "ppo"), "--updates", "2", *small]) == 0
    new = tmp_path / "elsewhere" / "project"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["rlhf", "ppo", "--resume", str(new / "ppo"), "--updates", "3", "--reward", f"{new / 'r.py'}:f"]) == 0
    assert len((new / "ppo" / "metrics.jsonl").read_text().splitlines()) == 3
    for run in ("ppo", "sft"):
        assert main(["export", str(new / run), "--out", str(tmp_path / f"exp-{run}")]) == 0
        assert (tmp_path / f"exp-{run}" / "config.json").is_file()
    shutil.move(str(new / "model"), str(tmp_path / "model-alone"))
    capsys.readouterr()
    assert main(["export", str(new / "sft"), "--out", str(tmp_path / "exp-3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model: no such file or directory") and str(old / "model") in err[0]
