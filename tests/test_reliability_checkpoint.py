"""Issue 5, guarantees 2 and 4: atomic checkpoints and safe (pickle-free) loading.

* Kill-during-save stress: a child process saves checkpoints of a few MB in a loop (rotation keep=1, and
  every other save re-writes the same step, so both the "new step" and the "replace a step" paths run)
  while the parent SIGKILLs it at random moments. After every kill the latest complete checkpoint must
  load and be internally consistent (a tensor equals a counter stored in state.json).
* Safe loading: pickle.load / pickle.loads / pickle.Unpickler / torch.load raise while every artifact loads.
* Malicious and broken files: rejected with a one-line CheckpointError, no code executed (a marker file
  that a pickle payload would create never appears), and through the CLI exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import proxrl
from proxrl.run import checkpoint
from proxrl.errors import CheckpointError

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = textwrap.dedent("""
    import sys, torch
    from proxrl.run import checkpoint
    root = sys.argv[1]
    try:
        i = int(checkpoint.load(checkpoint.latest(root))[1]["marker"]) + 1
    except Exception:
        i = 1
    big = torch.randn(768 * 1024)  # 3 MB of float32
    print("started", flush=True)
    while True:
        state = {"format": "proxrl.gym/1", "update": i, "step": i // 2, "marker": i,
                 "config": {"env": "CartPole-v1", "seed": i % 1000},
                 "policy": {"kind": "discrete", "obs_dim": 4, "act_dim": 2, "nvec": [], "critic": True}}
        tensors = {"marker": torch.full((1024,), float(i), dtype=torch.float64), "big": big + i}
        checkpoint.save(root, i // 2, tensors, state, keep=1)
        i += 1
""")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _check_latest(root: Path) -> int:
    """The latest checkpoint loads and is consistent; returns its marker."""
    tensors, state = checkpoint.load(checkpoint.latest(root))
    marker = state["marker"]
    # a kill between "old copy aside" and "new copy in place" of a same-step save leaves ``.old-ckpt-<step>``,
    # which list_checkpoints accepts as that step's checkpoint: the name must still match the state's step
    name = checkpoint.latest(root).name.removeprefix(".old-")
    assert state["step"] == marker // 2 and name == f"ckpt-{marker // 2:012d}"
    assert torch.equal(tensors["marker"], torch.full((1024,), float(marker), dtype=torch.float64))
    assert tensors["big"].shape == (768 * 1024,)
    return marker


def kill_during_save(root: Path, trials: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    script = root.parent / "child.py"
    script.write_text(CHILD)
    stats = {"trials": 0, "mid_save": 0, "failures": 0, "markers": []}
    for _ in range(trials):
        p = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, env=_env())
        assert p.stdout.readline().strip() == b"started"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        stats["trials"] += 1
        if any(q.name.startswith((".tmp-ckpt-", ".old-")) for q in root.iterdir()):
            stats["mid_save"] += 1  # the kill landed inside checkpoint.save
        if not checkpoint.list_checkpoints(root):
            continue  # killed before the first save finished: nothing to load yet (not a failure)
        try:
            stats["markers"].append(_check_latest(root))
        except Exception:
            stats["failures"] += 1
            raise
    return stats


def test_kill_during_save_latest_always_loads(tmp_path):
    root = tmp_path / "checkpoints"
    stats = kill_during_save(root, trials=5, seed=1)
    assert stats["failures"] == 0 and stats["markers"], stats
    assert stats["markers"] == sorted(stats["markers"])  # progress is never lost


@pytest.mark.slow
def test_kill_during_save_stress(tmp_path):
    root = tmp_path / "checkpoints"
    stats = kill_during_save(root, trials=60, seed=2)
    print(f"\nkill-during-save: trials={stats['trials']} mid_save={stats['mid_save']} "
          f"failures={stats['failures']} last_marker={stats['markers'][-1] if stats['markers'] else None}")
    assert stats["failures"] == 0 and len(stats["markers"]) >= 50
    assert stats["mid_save"] >= 10  # the kills really did land inside saves
    assert stats["markers"] == sorted(stats["markers"])


def test_rotation_keeps_the_new_checkpoint_and_replaces_atomically(tmp_path):
    root = tmp_path / "c"
    state = lambda i: {"format": "proxrl.gym/1", "update": i, "step": i, "marker": i, "config": {},
                       "policy": {"kind": "discrete", "obs_dim": 4, "act_dim": 2, "nvec": [], "critic": False}}
    for i in (5, 6, 7):
        checkpoint.save(root, i, {"x": torch.tensor([float(i)])}, state(i), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["ckpt-000000000006", "ckpt-000000000007"]
    # a save with a lower step (e.g. a resume from an older checkpoint) is never rotated away
    checkpoint.save(root, 3, {"x": torch.tensor([3.0])}, state(3), keep=1)
    assert (root / "ckpt-000000000003").is_dir()
    # re-saving a step replaces it; a stale ".old-" copy (a kill between the two renames) is still found
    checkpoint.save(root, 7, {"x": torch.tensor([70.0])}, state(70), keep=5)
    assert checkpoint.load(root / "ckpt-000000000007")[1]["marker"] == 70
    os.replace(root / "ckpt-000000000007", root / ".old-ckpt-000000000007")
    assert checkpoint.latest(root).name == ".old-ckpt-000000000007"
    assert checkpoint.load(root)[1]["marker"] == 70
    assert not any(p.name.startswith(".tmp-ckpt-") for p in root.iterdir())


# ------------------------------------------------------------------------------------- safe loading
def _forbid_pickle(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle/torch.load called on a load path")

    class NoUnpickler:
        def __init__(self, *a, **k):
            boom()

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", boom)


@pytest.fixture(scope="module")
def gym_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gym") / "run"
    proxrl.train(env="CartPole-v1", algo="ppo-clip", steps=128, num_envs=2, num_steps=32, seed=3, out=str(out),
                 progress="off", obs_norm=True, checkpoint_every=1)
    return out


def test_every_gym_artifact_loads_without_pickle(gym_run, monkeypatch):
    _forbid_pickle(monkeypatch)
    loaded = 0
    for ckpt in checkpoint.list_checkpoints(gym_run / "checkpoints"):
        tensors, state = checkpoint.load(ckpt)
        assert state["format"] == "proxrl.gym/1" and tensors
        loaded += 1
    agent = proxrl.load(gym_run)
    assert agent.act(torch.zeros(4).numpy()).shape == ()
    ev = proxrl.evaluate(gym_run, episodes=2)
    assert ev["episodes"] == 2
    from proxrl.run.plot import read_metrics

    assert read_metrics(gym_run)
    json.loads((gym_run / "config.json").read_text())
    assert loaded >= 1


def test_lm_artifacts_load_without_pickle(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from proxrl.lm.loading import load_causal_lm, load_tokenizer
    from proxrl.lm.tiny import make_tiny

    tiny = make_tiny(tmp_path / "tiny", arch="llama")
    _forbid_pickle(monkeypatch)
    model = load_causal_lm(str(tiny))
    tok = load_tokenizer(str(tiny))
    assert model is not None and tok.pad_token_id != tok.eos_token_id
    # an SFT-stage checkpoint (the format the lm stages write) validates and loads
    checkpoint.save(tmp_path / "sft" / "checkpoints", 1, {"policy.lm.x": torch.zeros(2)}, {"stage": "sft", "step": 1})
    assert checkpoint.load(tmp_path / "sft" / "checkpoints")[1]["stage"] == "sft"


# ------------------------------------------------------------------------------------- malicious files
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _good_state() -> dict:
    return {"format": "proxrl.gym/1", "update": 1, "step": 64, "config": {"env": "CartPole-v1"},
            "policy": {"kind": "discrete", "obs_dim": 4, "act_dim": 2, "nvec": [], "critic": True}}


def _write(ckpt: Path, tensors: bytes | None = None, state=None, state_raw: bytes | None = None) -> None:
    ckpt.mkdir(parents=True)
    if tensors is None:
        from safetensors.torch import save
        tensors = save({"policy/x": torch.zeros(3)})
    (ckpt / "tensors.safetensors").write_bytes(tensors)
    (ckpt / "state.json").write_bytes(state_raw if state_raw is not None else json.dumps(state or _good_state()).encode())


def _valid_tensors() -> bytes:
    from safetensors.torch import save
    return save({"policy/x": torch.arange(1000, dtype=torch.float32)})


def _malicious_cases(marker: Path) -> dict[str, dict]:
    pkl = pickle.dumps(_Payload(marker))
    buf = __import__("io").BytesIO()
    torch.save({"x": _Payload(marker)}, buf)  # a torch zip checkpoint holding a pickle payload
    good = _valid_tensors()
    (n,) = struct.unpack("<Q", good[:8])
    huge_header = struct.pack("<Q", 2 ** 40) + b"{}"
    hdr_over_file = struct.pack("<Q", 10_000) + b'{"a": 1}'
    bad_offsets = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4_000_000]}}).encode()
    bad_dtype = json.dumps({"x": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 8]}}).encode()
    wrong_size = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    st = _good_state
    return {
        "pickle renamed to .safetensors": dict(tensors=pkl),
        "torch.save zip renamed to .safetensors": dict(tensors=buf.getvalue()),
        "pickle as state.json": dict(state_raw=pkl),
        "empty tensors file": dict(tensors=b""),
        "tensors truncated to 5 bytes": dict(tensors=good[:5]),
        "tensors truncated in the header": dict(tensors=good[: 8 + n // 2]),
        "tensors truncated in the data": dict(tensors=good[: 8 + n + 100]),
        "header length 2**40": dict(tensors=huge_header),
        "header longer than the file": dict(tensors=hdr_over_file),
        "header not JSON": dict(tensors=struct.pack("<Q", 4) + b"\xff\xfe\x00\x01"),
        "header a JSON list": dict(tensors=struct.pack("<Q", 2) + b"[]"),
        "tensor offsets past the end": dict(tensors=struct.pack("<Q", len(bad_offsets)) + bad_offsets + b"\0" * 16),
        "unknown dtype": dict(tensors=struct.pack("<Q", len(bad_dtype)) + bad_dtype + b"\0" * 8),
        "byte size does not match shape": dict(tensors=struct.pack("<Q", len(wrong_size)) + wrong_size + b"\0" * 8),
        "state.json a list": dict(state_raw=b"[1, 2, 3]"),
        "state.json truncated": dict(state_raw=json.dumps(st()).encode()[:30]),
        "state.json empty": dict(state_raw=b""),
        "state.json not UTF-8": dict(state_raw=b"\xff\xfe{"),
        "state.json deeply nested": dict(state_raw=b"[" * 100_000 + b"]" * 100_000),
        "unknown format": dict(state={**st(), "format": "evil/9"}),
        "no format or stage": dict(state={"update": 1}),
        "update a string": dict(state={**st(), "update": "1"}),
        "step negative": dict(state={**st(), "step": -4}),
        "step a bool": dict(state={**st(), "step": True}),
        "config a list": dict(state={**st(), "config": [1]}),
        "config unknown field": dict(state={**st(), "config": {"__class__": "os.system"}}),
        "config gamma a string": dict(state={**st(), "config": {"gamma": "0.99"}}),
        "config hidden a string": dict(state={**st(), "config": {"hidden": "64"}}),
        "policy missing": dict(state={k: v for k, v in st().items() if k != "policy"}),
        "policy.kind unknown": dict(state={**st(), "policy": {**st()["policy"], "kind": "evil"}}),
        "policy.obs_dim zero": dict(state={**st(), "policy": {**st()["policy"], "obs_dim": 0}}),
        "policy.nvec strings": dict(state={**st(), "policy": {**st()["policy"], "nvec": ["a"]}}),
        "policy.critic a string": dict(state={**st(), "policy": {**st()["policy"], "critic": "yes"}}),
        "lm stage unknown": dict(state={"stage": "evil", "step": 1}),
        "lm step a float": dict(state={"stage": "sft", "step": 1.5}),
        "weights of the wrong shape": dict(tensors=_valid_tensors()),  # policy/x does not fit the policy
    }


MALICIOUS = list(_malicious_cases(Path("/nonexistent")))


@pytest.mark.parametrize("case", MALICIOUS)
def test_malicious_checkpoint_rejected_one_line(case, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    spec = _malicious_cases(marker)[case]
    run = tmp_path / "run"
    _write(run / "checkpoints" / "ckpt-000000000001", **spec)
    _forbid_pickle(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        if case == "weights of the wrong shape":
            proxrl.load(run)
        else:
            checkpoint.load(run / "checkpoints")
    msg = str(e.value)
    assert msg and "\n" not in msg and len(msg) < 400, msg
    assert not marker.exists()


def test_malicious_checkpoint_through_cli(tmp_path):
    """`proxrl eval` on hostile run directories: exit 2, one stderr line, no traceback, no code run."""
    marker = tmp_path / "PWNED"
    cases = _malicious_cases(marker)
    picked = ["pickle renamed to .safetensors", "header length 2**40", "config gamma a string"]
    for name in picked:
        run = tmp_path / name.replace(" ", "_").replace("/", "_")
        _write(run / "checkpoints" / "ckpt-000000000001", **cases[name])
        p = subprocess.run([sys.executable, "-m", "proxrl", "eval", str(run), "--episodes", "1"], capture_output=True,
                           text=True, env=_env(), timeout=300)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (name, p.stderr)
        assert lines[0].startswith("error: ")
    assert not marker.exists()


def test_an_optimizer_moment_of_the_wrong_shape_is_one_line(tmp_path):
    """A checkpoint whose Adam moment no longer fits its parameter (a well-formed safetensors file): the fused
    Adam kernel checks no sizes and used to write out of bounds on resume (glibc aborted the process). Now one
    CheckpointError line, exit 2, the run's files untouched."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "proxrl", "train", "--env", "CartPole-v1", "--algo", "ppo-clip",
                        "--steps", "256", "--num-envs", "2", "--num-steps", "64", "--progress", "off", "--out", str(run)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    path = checkpoint.latest(run / "checkpoints") / "tensors.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.startswith("optimizer/") and k.endswith("/exp_avg"))
    tensors[key] = torch.zeros(3)
    save_file(tensors, str(path))
    before = path.read_bytes()
    p = subprocess.run([sys.executable, "-m", "proxrl", "train", "--resume", str(run), "--steps", "512"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "optimizer moment exp_avg" in lines[0], (p.returncode, p.stderr)
    assert path.read_bytes() == before


def test_a_flipped_bit_in_the_tensor_data_is_one_line(tmp_path):
    """The header checks cannot see the data: a checksum of every tensor (name, dtype, shape, bytes) is written
    into the safetensors header and checked at load. A checkpoint written before it (no checksum) still loads."""
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(4, 3), "step": torch.tensor(7), "h": torch.zeros(5, dtype=torch.bfloat16)}
    path = checkpoint.save(tmp_path / "c", 1, tensors, {"stage": "sft", "step": 1}) / "tensors.safetensors"
    got, _ = checkpoint.load(tmp_path / "c")
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    raw = bytearray(path.read_bytes())
    for i in (len(raw) - 1, len(raw) - 20):  # a bit of the last tensor's data, then of an earlier one
        bad = bytearray(raw)
        bad[i] ^= 0x04
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="does not match the checksum") as e:
            checkpoint.load(tmp_path / "c")
        assert "\n" not in str(e.value)
    save_file(tensors, str(path), metadata={"format": "proxrl"})  # the format before the checksum
    assert torch.equal(checkpoint.load(tmp_path / "c")[0]["w"], tensors["w"])


def test_trust_remote_code_never_switched_on():
    """No source file turns on transformers' trust_remote_code (it stays at its default, False)."""
    import re

    hits = [f"{p}:{i}" for p in Path(SRC).rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"trust_remote_code\s*=\s*(True|1)", line)]
    assert not hits, hits


def test_a_valid_checkpoint_whose_header_length_starts_with_0x80_loads(tmp_path):
    """The pickle signature check used to look at the first byte alone, so a valid safetensors file whose
    8-byte header length happened to have 0x80 as its low byte (1 file in 256) was refused as a pickle."""
    import struct

    import torch

    from proxrl.run import checkpoint

    for pad in range(300):  # key lengths that move the header length through every low byte
        tensors = {"x" * (1 + pad): torch.zeros(1)}
        root = tmp_path / f"c{pad}"
        checkpoint.save(root, 1, tensors, {"stage": "sft", "step": 1})
        raw = (checkpoint.latest(root) / "tensors.safetensors").read_bytes()
        if raw[:1] == b"\x80":
            assert checkpoint.load(root)[0][next(iter(tensors))].shape == (1,)
            return
    pytest.fail("no header length with low byte 0x80 was produced")


def test_a_full_disk_during_a_run_is_one_line_and_the_earlier_checkpoints_stay(tmp_path, monkeypatch, capsys):
    """The disk filling up while a checkpoint is written (safetensors' own I/O error) or while a metrics line
    is synced (an OSError): one line, exit 2, no traceback; the complete checkpoints before it untouched, no
    temporary left, and the run resumes once there is space again."""
    import errno

    import safetensors
    import safetensors.torch

    from proxrl.cli import main

    run = tmp_path / "run"
    tiny = ["--env", "CartPole-v1", "--algo", "ppo-clip", "--num-envs", "2", "--num-steps", "16", "--preset", "none",
            "--num-minibatches", "2", "--update-epochs", "1", "--checkpoint-every", "1"]
    assert main(["train", "--progress", "off", *tiny, "--steps", "64", "--out", str(run)]) == 0
    before = {p.name: (p / "tensors.safetensors").read_bytes() for p in checkpoint.list_checkpoints(run / "checkpoints")}
    capsys.readouterr()

    def one_line(field_or_text: str) -> str:
        rc = main(["train", "--progress", "off", "--resume", str(run), "--steps", "128"])
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
        assert lines[0].startswith("error: ") and field_or_text in lines[0], lines[0]
        assert {p.name: (p / "tensors.safetensors").read_bytes()
                for p in checkpoint.list_checkpoints(run / "checkpoints")} == before
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-ckpt-")]
        return lines[0]

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # part of the file, then the disk is full
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        line = one_line("ckpt-000000000003")
        assert "No space left on device" in line and "intact" in line

    def nospace(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", nospace)  # the metrics lines synced before the checkpoint
        assert one_line("error: disk: ").count("No space left on device") == 1

    def readonly(fd):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", readonly)  # the disk remounted read-only: the fix said is not "free disk space"
        assert "make it writable" in one_line("error: disk: ")
    assert main(["train", "--progress", "off", "--resume", str(run), "--steps", "128"]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
