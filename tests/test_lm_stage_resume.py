"""SFT and the reward model never lose a run: SIGTERM/SIGINT mid-epoch writes a checkpoint after the step in
progress and stops (exit 143/130 from the CLI); a run that dies after a periodic checkpoint resumes from it;
``--resume`` continues either exactly as the uninterrupted run (every metrics line but wall-clock time, the
final weights, the summary); an unfinished run is refused by what loads its model, resume refuses a changed
option or data. Tiny random llama, in-process (signals sent to this process) and one CLI run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from safetensors.torch import load_file

from proxrl.errors import CheckpointError, ConfigError
from proxrl.lm.config import RMConfig, SFTConfig
from proxrl.lm.data import write_jsonl
from proxrl.lm.rm import reward_model
from proxrl.lm.sft_trainer import sft
from proxrl.lm.tiny import make_tiny
from proxrl.run import checkpoint
from proxrl.run.signals import RunInterrupted

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage_resume")
    make_tiny(tmp / "model", arch="llama", layers=1, hidden=16, seed=0)
    write_jsonl(tmp / "demos.jsonl", [{"prompt": f"q{i}", "response": "ab" * (1 + i % 3)} for i in range(11)])
    write_jsonl(tmp / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "a" * (1 + i % 4), "rejected": "z" * (1 + i % 3)}
                                      for i in range(14)])
    return tmp


def sft_cfg(work: Path, out: str, **kw) -> SFTConfig:
    base = dict(model=str(work / "model"), data=str(work / "demos.jsonl"), out=str(work / out), epochs=3,
                batch_size=4, micro_batch_size=2, lr=3e-3, finetune="lora", lora_r=2, seed=5, checkpoint_every=0)
    return SFTConfig(**{**base, **kw})


def rm_cfg(work: Path, out: str, **kw) -> RMConfig:
    base = dict(model=str(work / "model"), data=str(work / "prefs.jsonl"), out=str(work / out), epochs=2,
                batch_size=4, micro_batch_size=3, lr=3e-3, finetune="full", eval_fraction=0.2, seed=7,
                checkpoint_every=0)
    return RMConfig(**{**base, **kw})


def stop_at(step: int, sig=signal.SIGTERM):
    """A log function that sends ``sig`` to this process when the stage logs step ``step``."""
    def log(line: str) -> None:
        if f" step {step} " in line + " ":
            os.kill(os.getpid(), sig)
    return log


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in ("time", "wall_time")}
            for l in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(a) == metrics(b)
    ta = load_file(str(checkpoint.latest(a / "checkpoints") / "tensors.safetensors"))
    tb = load_file(str(checkpoint.latest(b / "checkpoints") / "tensors.safetensors"))
    assert ta.keys() == tb.keys() and not [k for k in ta if not torch.equal(ta[k], tb[k])]
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert {k: v for k, v in sa.items() if k != "wall_time"} == {k: v for k, v in sb.items() if k != "wall_time"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sft_stopped_mid_epoch_resumes_exactly(work, sig):
    sft(sft_cfg(work, f"sft-ref-{sig}"), log=lambda *_: None)  # 3 epochs × 3 steps
    with pytest.raises(RunInterrupted) as e:
        sft(sft_cfg(work, f"sft-stop-{sig}"), log=stop_at(5, sig))  # epoch 2, its second of three steps
    assert e.value.exit_code == 128 + sig and "after step 5" in str(e.value) and "--resume" in str(e.value)
    stopped = work / f"sft-stop-{sig}"
    assert len(metrics(stopped)) == 5 and checkpoint.latest(stopped / "checkpoints").name == f"ckpt-{5:012d}"
    sft(SFTConfig(resume=str(stopped)), log=lambda *_: None)
    assert_same_run(work / f"sft-ref-{sig}", stopped)


def test_sft_dead_after_a_periodic_checkpoint_resumes_exactly(work, monkeypatch):
    """A run killed (here: an error at step 7) after its step-4 checkpoint: resume cuts the metrics back to
    step 4 and continues to the uninterrupted run's end."""
    sft(sft_cfg(work, "sft-ref-every", checkpoint_every=4), log=lambda *_: None)
    from proxrl.run.rundir import RunWriter

    real = RunWriter.metrics

    def dying(self, row):
        real(self, row)
        if row.get("step") == 7:
            raise RuntimeError("killed")

    monkeypatch.setattr(RunWriter, "metrics", dying)
    with pytest.raises(RuntimeError, match="killed"):
        sft(sft_cfg(work, "sft-died", checkpoint_every=4), log=lambda *_: None)
    monkeypatch.setattr(RunWriter, "metrics", real)
    died = work / "sft-died"
    assert len(metrics(died)) == 7 and checkpoint.latest(died / "checkpoints").name == f"ckpt-{4:012d}"
    sft(SFTConfig(resume=str(died)), log=lambda *_: None)
    assert_same_run(work / "sft-ref-every", died)


def test_rm_stopped_resumes_exactly_and_an_unfinished_rm_is_refused(work):
    reward_model(rm_cfg(work, "rm-ref"), log=lambda *_: None)  # 11 training pairs: 3 steps per epoch
    with pytest.raises(RunInterrupted):
        reward_model(rm_cfg(work, "rm-stop"), log=stop_at(4))
    stopped = work / "rm-stop"
    from proxrl.lm.policy import load_reward_model

    with pytest.raises(CheckpointError, match=r"stopped after step 4 of 6 .*proxrl rlhf rm --resume"):
        load_reward_model(stopped)
    reward_model(RMConfig(resume=str(stopped)), log=lambda *_: None)
    assert_same_run(work / "rm-ref", stopped)
    load_reward_model(stopped)  # finished: loads


def test_an_unfinished_sft_run_is_refused_as_a_policy_and_resume_checks(work):
    with pytest.raises(RunInterrupted):
        sft(sft_cfg(work, "sft-half"), log=stop_at(2))
    half = work / "sft-half"
    from proxrl.lm.export import ExportConfig, export

    with pytest.raises(CheckpointError, match="not finished; finish it with: proxrl rlhf sft --resume"):
        export(ExportConfig(run=str(half), out=str(work / "exported")))
    with pytest.raises(ConfigError, match="lr"):  # an option that would change the run
        sft(SFTConfig(resume=str(half), lr=1e-3), log=lambda *_: None, explicit={"resume", "lr"})
    with pytest.raises(ConfigError, match="overwrite"):
        sft(SFTConfig(resume=str(half), overwrite=True), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="not a checkpoint of `proxrl rlhf rm`"):
        reward_model(RMConfig(resume=str(half)), log=lambda *_: None)
    demos = (work / "demos.jsonl").read_text()
    try:  # the data changed since the checkpoint
        (work / "demos.jsonl").write_text(demos.replace('"q3"', '"q33"'))
        with pytest.raises(CheckpointError, match="changed since the checkpoint"):
            sft(SFTConfig(resume=str(half)), log=lambda *_: None)
    finally:
        (work / "demos.jsonl").write_text(demos)
    sft(SFTConfig(resume=str(half)), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="finished"):  # nothing left to resume
        sft(SFTConfig(resume=str(half)), log=lambda *_: None)


def test_cli_sigterm_exits_143_with_the_resume_command_and_resumes(work):
    out = work / "sft-cli"
    args = ["--model", str(work / "model"), "--data", str(work / "demos.jsonl"), "--out", str(out), "--epochs", "200",
            "--batch-size", "4", "--micro-batch-size", "4", "--finetune", "lora", "--lora-r", "2"]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "proxrl", "rlhf", "sft", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the first training step logged: stop it
        if "sft step 2 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"resume with: proxrl rlhf sft --resume {out}" in err and "Traceback" not in err
    done = len(metrics(out))
    assert 2 <= done < 600 and checkpoint.latest(out / "checkpoints").name == f"ckpt-{done:012d}"
    r = subprocess.run([sys.executable, "-m", "proxrl", "rlhf", "sft", "--resume", str(out), "--epochs", "3"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "epochs" in r.stderr and "Traceback" not in r.stderr  # a changed option: one line


def test_a_torchrun_restart_continues_only_its_own_run(work, monkeypatch):
    """A worker restarted by torchrun (--max-restarts) whose --out holds a checkpointed run continues it only when
    it is its own (the command's whole config equals the saved one): the run another command left there (its
    first attempt was refused, or died before replacing it with --overwrite) is refused in one line, not
    continued silently with the old config."""
    sft(sft_cfg(work, "sft-restart-ref", epochs=2), log=lambda *_: None)
    with pytest.raises(RunInterrupted):
        sft(sft_cfg(work, "sft-restart", epochs=2), log=stop_at(2))
    run = work / "sft-restart"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for other in (dict(lr=1e-3), dict(epochs=1), dict(finetune="full", overwrite=True)):
        with pytest.raises(ConfigError, match="continues only its own run"):
            sft(sft_cfg(work, "sft-restart", **{"epochs": 2, **other}), log=lambda *_: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    sft(sft_cfg(work, "sft-restart", epochs=2, overwrite=True), log=lambda *_: None)  # its own: continues
    assert_same_run(work / "sft-restart-ref", run)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_a_signal_after_the_last_step_lets_the_stage_finish(work, stage):
    """SIGTERM while the stage writes its end (the reward model scores every training pair before its final
    checkpoint; SFT generates its samples): the stage finishes (final checkpoint, summary, exit 0) instead of
    being killed with no checkpoint at all (--checkpoint-every 0: the whole run was lost)."""
    out = work / f"{stage}-term-at-end"
    data = work / ("demos.jsonl" if stage == "sft" else "prefs.jsonl")
    hook = ("import proxrl.lm.rm as m; real = m.score_pairs; sent = []\n"
            "def hooked(*a, **k):\n"
            "    if torch.is_inference_mode_enabled() and not sent: sent.append(os.kill(os.getpid(), signal.SIGTERM))\n"
            "    return real(*a, **k)\n"
            "m.score_pairs = hooked\n") if stage == "rm" else (
            "import proxrl.lm.sft_trainer as m; real = m.greedy_answers\n"
            "def hooked(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "m.greedy_answers = hooked\n")
    code = ("import os, signal, sys, torch\n" + hook + "from proxrl.cli import main\nsys.exit(main([\"rlhf\", *sys.argv[1:]]))")
    args = [stage, "--model", str(work / "model"), "--data", str(data), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--finetune", "lora", "--lora-r", "2", "--checkpoint-every", "0"]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    state = checkpoint.load(out / "checkpoints")[1]
    assert "complete" not in state and state["step"] == len(metrics(out)) - (stage == "rm")  # rm: + a final line
    assert (out / "summary.json").is_file()


def test_resume_accepts_device_auto_given_again(work, tmp_path):
    """The run records the device ``--device auto`` chose; the same ``--device auto`` given again with --resume is
    no change (it was refused: "cannot change to 'auto'"), for SFT/RM and for PPO."""
    with pytest.raises(RunInterrupted):
        sft(sft_cfg(work, "sft-auto", device="auto"), log=stop_at(2))
    sft(SFTConfig(resume=str(work / "sft-auto"), device="auto"), log=lambda *_: None, explicit={"resume", "device"})
    assert len(metrics(work / "sft-auto")) == 9
    import dataclasses

    from proxrl.lm.config import PPOConfig
    from proxrl.lm.ppo_trainer import resolve_resume
    from proxrl.run.device import resolve_device

    saved = dataclasses.asdict(PPOConfig(policy=str(work / "model"), reward="r.py:r", prompts=str(work / "demos.jsonl"),
                                         device=resolve_device("auto"), out=str(tmp_path)))
    checkpoint.save(tmp_path / "checkpoints", 1, {"x": torch.zeros(1)},
                    {"stage": "ppo", "version": 1, "step": 1, "config": saved, "run": {}})
    had, _, _ = resolve_resume(PPOConfig(resume=str(tmp_path), reward="r.py:r", device="auto"), reward_given=True,
                               explicit=["resume", "reward", "device"])
    assert had.device == resolve_device("auto")


def test_a_checkpoint_whose_place_in_the_run_was_edited_is_refused(work):
    """state.json's step/epoch/minibatch (or the config's epochs/batch size) edited so that they no longer fit
    together: refused in one line — it used to run silently another run (epoch 7 of 3: 'finished' after 2 of 9
    steps; epoch -1: 12 steps; minibatch 99: an epoch skipped; config epochs 1: 3 steps)."""
    with pytest.raises(RunInterrupted):
        sft(sft_cfg(work, "sft-edited"), log=stop_at(2))
    run = work / "sft-edited"
    state_file = checkpoint.latest(run / "checkpoints") / "state.json"
    original = state_file.read_text()
    edits = [("run", "epoch", 7), ("run", "epoch", -1), ("run", "minibatch", 99), ("run", "minibatch", 1),
             (None, "step", 50), ("run", "total_steps", 3), ("config", "epochs", 1), ("config", "batch_size", 3)]
    for where, key, value in edits:
        state = json.loads(original)
        (state[where] if where else state)[key] = value
        state_file.write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match="was state.json edited"):
            sft(SFTConfig(resume=str(run)), log=lambda *_: None)
    state_file.write_text(original)
    sft(SFTConfig(resume=str(run)), log=lambda *_: None)
    assert len(metrics(run)) == 9


def test_a_torchrun_restart_starts_again_only_over_its_own_first_attempt(work, monkeypatch):
    """A restarted worker whose --out holds a run without checkpoints starts again over it only when it is its
    own first attempt's (config.json = the command's config); another command's run there (which the first
    attempt refused: 'already holds a run') used to be deleted and replaced."""
    sft(sft_cfg(work, "sft-old", epochs=1), log=lambda *_: None)
    import shutil

    old = work / "sft-old"
    shutil.rmtree(old / "checkpoints")  # e.g. removed to save space; its metrics and summary kept
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(ConfigError, match="already holds a run"):
        sft(sft_cfg(work, "sft-old", epochs=1, lr=1e-3), log=lambda *_: None)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    sft(sft_cfg(work, "sft-old", epochs=1), log=lambda *_: None)  # its own first attempt: started again
    assert len(metrics(old)) == 3 and checkpoint.latest(old / "checkpoints").name == f"ckpt-{3:012d}"


def _ppo_cfg(work: Path, out: str, **kw):
    from proxrl.lm.config import PPOConfig

    write_jsonl(work / "prompts.jsonl", [{"prompt": f"say {i}:"} for i in range(8)])
    base = dict(policy=str(work / "model"), reward="r:fn", prompts=str(work / "prompts.jsonl"), out=str(work / out),
                updates=3, batch_size=4, micro_batch_size=2, response_length=4, eval_prompts=2, lora_r=2,
                checkpoint_every=1, chat_template="off", seed=2)
    return PPOConfig(**{**base, **kw})


def _reward(prompts, responses):
    return [r.count("a") / max(len(r), 1) for r in responses]


def test_a_torchrun_restart_of_ppo_continues_only_its_own_run(work, monkeypatch):
    """RL on tokens, the same two restart rules as SFT/RM: a restarted worker continues the checkpointed run in
    --out only when its whole config is the command's (an option left at its default that differs counts),
    and starts again over a run without checkpoints only when it is its own first attempt's."""
    from proxrl.lm.ppo_trainer import ppo

    def stop_after_1(line: str) -> None:
        if line.startswith("update   1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted):
        ppo(_ppo_cfg(work, "ppo-restart"), reward=_reward, log=stop_after_1)
    run = work / "ppo-restart"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for other in (dict(lr=3e-5), dict(response_length=5)):  # given, or away from the saved run's value
        with pytest.raises(ConfigError):
            ppo(_ppo_cfg(work, "ppo-restart", **other), reward=_reward, log=lambda *_: None, explicit={"policy"})
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    ppo(_ppo_cfg(work, "ppo-restart"), reward=_reward, log=lambda *_: None, explicit={"policy"})  # its own: continues
    assert len(metrics(run)) == 3
    import shutil

    shutil.rmtree(run / "checkpoints")  # now a run without checkpoints: another command's is not replaced
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run"):
        ppo(_ppo_cfg(work, "ppo-restart", lr=3e-5), reward=_reward, log=lambda *_: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_may_change_how_often_checkpoints_are_written(work):
    """--checkpoint-every / --keep-checkpoints change no result: accepted with --resume (SFT here; PPO the same)."""
    with pytest.raises(RunInterrupted):
        sft(sft_cfg(work, "sft-every"), log=stop_at(2))
    run = work / "sft-every"
    sft(SFTConfig(resume=str(run), checkpoint_every=2, keep_checkpoints=1), log=lambda *_: None,
        explicit={"resume", "checkpoint_every", "keep_checkpoints"})
    assert len(list((run / "checkpoints").glob("ckpt-*"))) == 1 and len(metrics(run)) == 9
