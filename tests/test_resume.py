"""Exact resume: a run killed (SIGKILL) at a random update and resumed equals the uninterrupted run,
bit for bit — every metrics line (wall-clock fields aside) and every saved tensor. Graceful stop:
SIGTERM/SIGINT finish the update, checkpoint, exit 143/130, and the run resumes from there."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from proxrl.run import checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
WALL = ("sps", "time")


def cli(*args, wait=True):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "proxrl", *args]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in WALL} for l in open(run / "metrics.jsonl")]


def final_tensors(run: Path) -> dict:
    return load_file(str(checkpoint.latest(run / "checkpoints") / "tensors.safetensors"))


def assert_identical(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) and ma == mb
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different


def wait_for_lines(run: Path, n: int, proc, timeout=300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = run / "metrics.jsonl"
        if p.exists() and len(p.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timeout")


CASES = {
    "ppo-clip": ["--env", "CartPole-v1", "--algo", "ppo-clip", "--obs-norm", "--reward-norm"],
    "ppo-kl": ["--env", "Acrobot-v1", "--algo", "ppo-kl", "--obs-norm"],
    "trpo": ["--env", "Pendulum-v1", "--algo", "trpo", "--obs-norm", "--reward-norm"],
}
COMMON = ["--steps", "3072", "--num-envs", "4", "--num-steps", "128", "--seed", "11", "--preset", "none",
          "--checkpoint-every", "1", "--progress", "off"]


@pytest.mark.parametrize("algo", list(CASES))
def test_sigkill_then_resume_is_bit_identical(algo, tmp_path):
    args = CASES[algo] + COMMON
    ref = tmp_path / "ref"
    assert cli("train", *args, "--out", str(ref)).returncode == 0
    run = tmp_path / "killed"
    kill_after = random.Random(algo).randint(1, 4)  # of 6 updates
    proc = cli("train", *args, "--out", str(run), wait=False)
    wait_for_lines(run, kill_after, proc)
    while not checkpoint.list_checkpoints(run / "checkpoints") and proc.poll() is None:
        time.sleep(0.01)  # the metrics line of an update is written just before its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(ref, run)


GRACEFUL = CASES["ppo-clip"] + COMMON[:-4] + ["--checkpoint-every", "0", "--progress", "off"]


@pytest.fixture(scope="module")
def graceful_ref(tmp_path_factory):
    ref = tmp_path_factory.mktemp("graceful") / "ref"
    assert cli("train", *GRACEFUL, "--out", str(ref)).returncode == 0
    return ref


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_graceful_stop_checkpoints_and_resumes(sig, code, tmp_path, graceful_ref):
    args, ref = GRACEFUL, graceful_ref
    run = tmp_path / "stopped"
    proc = cli("train", *args, "--out", str(run), wait=False)
    wait_for_lines(run, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "resume with" in err and "Traceback" not in err
    stopped_at = len(metrics(run))
    assert stopped_at < 6 and checkpoint.latest(run / "checkpoints").name.endswith(f"{stopped_at:012d}")
    assert cli("train", "--resume", str(run)).returncode == 0
    assert_identical(ref, run)


def test_same_seed_twice_is_bit_identical(tmp_path):
    args = CASES["trpo"] + COMMON
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("train", *args, "--out", str(a)).returncode == 0
    assert cli("train", *args, "--out", str(b)).returncode == 0
    assert_identical(a, b)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "HalfCheetah-v5"])
def test_env_state_dealt_to_other_vector_envs(env_id):
    """envstate.split_envs / merge_envs (a gym run resumed on another number of processes): 5 sync envs in
    mid-episode, dealt as 2 + 3 and merged back, give the same state; the 2-env part restored into a fresh
    vector env steps exactly as envs 0-1 of the original. A numpy-vectorised env is refused (shared generator)."""
    if env_id.startswith("HalfCheetah"):
        pytest.importorskip("mujoco")
    import gymnasium as gym

    from proxrl.gym import envstate
    from proxrl.gym.envs import make_vec_env

    v = make_vec_env(env_id, 5, "sync", {})
    v.reset(seed=1)
    v.action_space.seed(0)
    for _ in range(7):
        v.step(v.action_space.sample())
    t, m = envstate.get_state(v)
    parts = envstate.split_envs(t, m)
    a, b = envstate.merge_envs(parts[:2]), envstate.merge_envs(parts[2:])
    t2, m2 = envstate.merge_envs(envstate.split_envs(*a) + envstate.split_envs(*b))
    assert t.keys() == t2.keys() and all(torch.equal(t[k], t2[k]) for k in t)
    assert {k: m[k] for k in m if k != "unsupported"} == {k: m2[k] for k in m2 if k != "unsupported"}
    w = make_vec_env(env_id, 2, "sync", {})
    w.reset(seed=99)
    envstate.set_state(w, *a)
    for _ in range(3):
        act = v.action_space.sample()
        assert np.array_equal(v.step(act)[0][:2], w.step(act[:2])[0])
    v.close(), w.close()
    if gym.registry[env_id].vector_entry_point is not None:
        n = make_vec_env(env_id, 3, "numpy", {})
        n.reset(seed=1)
        with pytest.raises(ValueError, match="share their state"):
            envstate.split_envs(*envstate.get_state(n))
        n.close()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_during_the_checkpoint_stops_at_once_and_says_so(sig, code, tmp_path, monkeypatch, capsys):
    """A second signal that lands while the stop's checkpoint is being written: the run stops at once, that
    checkpoint is discarded whole (the one before it intact, no temporary left), the exit status is the
    signal's (it was 130, "error: interrupted", even for SIGTERM) and the line says the run resumes."""
    import safetensors.torch

    from proxrl.cli import main

    real = safetensors.torch.save_file

    def signalled(*a, **k):  # every checkpoint write receives a signal midway: the 1st stops, the 2nd is "twice"
        os.kill(os.getpid(), sig)
        real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", signalled)
    run = tmp_path / "r"
    rc = main(["train", "--env", "CartPole-v1", "--num-envs", "2", "--num-steps", "16", "--preset", "none",
               "--num-minibatches", "2", "--update-epochs", "1", "--checkpoint-every", "1", "--steps", "320",
               "--progress", "off", "--out", str(run)])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == code and len(lines) == 1 and signal.Signals(sig).name in lines[0] and "--resume" in lines[0], err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-000000000001"]
    monkeypatch.undo()
    assert main(["train", "--progress", "off", "--resume", str(run)]) == 0
    assert [json.loads(l)["update"] for l in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))


@pytest.mark.parametrize("env_id,captured", [("Hopper-v5", ["_healthy_z_range", "observation_structure"]),
                                             ("Humanoid-v5", ["_contact_cost_range", "observation_structure"])])
def test_mujoco_constants_are_captured_so_resume_warns_of_nothing(env_id, captured):
    """MuJoCo envs keep tuples with an infinite bound ((0.7, inf)) and a dict of ints (``observation_structure``):
    they used to be "not captured", so every MuJoCo resume warned that it may not be exact although it was.
    Skipped without MuJoCo (CI installs the ``lm`` and ``test`` extras, not ``mujoco``)."""
    pytest.importorskip("mujoco")
    from proxrl.gym.envs import make_vec_env
    from proxrl.gym.envstate import get_state, set_state

    vec = make_vec_env(env_id, 2, "sync")
    vec.reset(seed=0)
    tensors, meta = get_state(vec)
    assert not [k for k in meta["unsupported"] if not k.endswith("._previous_data")]  # the env checker's last step
    meta = json.loads(json.dumps(meta, allow_nan=False))  # strict JSON: the infinite bound is encoded
    fresh = make_vec_env(env_id, 2, "sync")
    fresh.reset(seed=5)
    for name in captured:
        setattr(fresh.envs[1].unwrapped, name, None)
    set_state(fresh, tensors, meta)
    for name in captured:
        assert getattr(fresh.envs[1].unwrapped, name) == getattr(vec.envs[1].unwrapped, name)
        assert type(getattr(fresh.envs[1].unwrapped, name)) is type(getattr(vec.envs[1].unwrapped, name))


@pytest.mark.parametrize("value", [(np.float32(1.5), 2), (np.int64(3),), [np.float64(0.5)]])
def test_an_env_attribute_holding_numpy_scalars_in_a_tuple_is_warned_about_not_a_crash(value, tmp_path, capsys):
    """A tuple of numpy scalars made the first checkpoint's ``json.dump`` raise TypeError (the run died); a list
    of np.float64 came back as Python floats (another type under numpy 2's promotion). Now not captured: warned."""
    import gymnasium as gym

    import proxrl

    class Env(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def __init__(self):
            self.attr, self.t = value, 0

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.zeros(2, np.float32), {}

        def step(self, a):
            self.t += 1
            return self.np_random.uniform(-1, 1, 2).astype(np.float32), 1.0, False, self.t >= 10, {}

    kw = dict(env_factory=Env, env="attr", algo="ppo-clip", num_envs=2, num_steps=32, progress="off",
              preset="none", checkpoint_every=1, anneal_lr=False)
    proxrl.train(steps=64, out=str(tmp_path / "run"), **kw)
    capsys.readouterr()
    proxrl.train(steps=128, resume=str(tmp_path / "run"), env_factory=Env)
    err = capsys.readouterr().err
    assert "not captured: env0.w0.attr, env1.w0.attr" in err
