"""One run, any number of processes (torchrun, gloo, 2 CPU processes, one thread each; every launch under a
timeout so nothing can hang). Exactness is checked on float64 tiny models: the 2-process run equals the
1-process run with the same global batch — metrics and final weights to ≤ 1e-9 relative."""

from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[1] / "src")
WALL = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time", "comm_time",
        "wall_time")
REWARD = '''
import math, os
def share(prompts, responses):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]
def nan_on_rank1(prompts, responses):
    bad = os.environ.get("RANK") == "1" and os.path.exists(os.environ["NAN_FLAG"])
    return [math.nan if bad else 0.1 for r in responses]
def slow(prompts, responses):
    import time; time.sleep(float(os.environ.get("SLOW", "0")))
    return share(prompts, responses)
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                **extra)


def one(args, timeout=240, **env):
    return subprocess.run([sys.executable, "-m", "proxrl", *args], capture_output=True, text=True,
                          env=_env(**env), timeout=timeout)


def two(args, timeout=240, extra=(), procs=2, **env):
    # --standalone: torchrun binds a free loopback port itself (no race with another run choosing ports)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *extra,
           "-m", "proxrl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.tiny import make_tiny

    tmp = tmp_path_factory.mktemp("dist")
    make_tiny(tmp / "model", seed=0)
    (tmp / "reward.py").write_text(REWARD)
    write_jsonl(tmp / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(20)])
    write_jsonl(tmp / "sft.jsonl", [{"prompt": f"q {i}", "response": "abc " * (1 + i % 3)} for i in range(10)])
    write_jsonl(tmp / "rm.jsonl", [{"prompt": f"q {i}", "chosen": "good " * (1 + i % 2), "rejected": "x"} for i in range(10)])
    return tmp


def ppo_args(tmp, out, reward="share", *more, batch="8", micro="2"):
    return ["rlhf", "ppo", "--policy", str(tmp / "model"), "--reward", f"{tmp / 'reward.py'}:{reward}", "--prompts",
            str(tmp / "p.jsonl"), "--out", str(out), "--updates", "3", "--batch-size", batch, "--num-minibatches", "2",
            "--micro-batch-size", micro, "--response-length", "6", "--eval-prompts", "4", "--chat-template", "off",
            "--lora-r", "2", "--dtype", "float64", "--lr", "1e-2", "--seed", "1", *more]


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in WALL} for l in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, tol=1e-9):
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb) and ra, (len(ra), len(rb))
    for x, y in zip(ra, rb):
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float):
                assert abs(x[k] - y[k]) <= tol * max(abs(x[k]), 1e-12) + 1e-15, (k, x[k], y[k])
            else:
                assert x[k] == y[k], (k, x[k], y[k])
    ta = load_file(sorted((a / "checkpoints").glob("ckpt-*"))[-1] / "tensors.safetensors")
    tb = load_file(sorted((b / "checkpoints").glob("ckpt-*"))[-1] / "tensors.safetensors")
    keys = [k for k in ta if k.startswith("policy.") or k.startswith("optimizer/")]
    assert keys and set(keys) <= set(tb)
    for k in keys:
        scale = ta[k].abs().max().clamp(min=1e-30)
        assert float((ta[k] - tb[k]).abs().max() / scale) <= tol, k


def gym_args(out, *more, algo="ppo-clip", steps=3072, envs=4, seed=2, env="CartPole-v1"):
    """CartPole (or ``env``) with observation and reward normalisation on per-env (sync) envs, the gym tests' run."""
    return ["train", "--env", env, "--algo", algo, "--steps", str(steps), "--num-envs", str(envs),
            "--num-steps", "128", "--vectorization", "sync", "--obs-norm", "--reward-norm", "--seed", str(seed),
            "--preset", "none", "--progress", "off", "--out", str(out), *more]


def gym_rows(run: Path) -> list[dict]:
    """A gym run's metrics lines without wall and communication times (what bit-identical runs share)."""
    return [{k: v for k, v in x.items() if k not in ("sps", "comm_time")} for x in rows(run)]


def _last_tensors(run: Path) -> dict:
    return load_file(sorted((run / "checkpoints").glob("ckpt-*"))[-1] / "tensors.safetensors")


def assert_close_gym_rows(a: list, b: list, n: int, tol=1e-4):
    """The gym's metrics lines equal up to float32 rounding (its networks are float32); counts, flags and
    nulls exactly. Wall time and communication time are not compared."""
    assert len(a) == len(b) == n
    for x, y in zip(a, b):
        for k in x:
            if k in ("sps", "comm_time"):
                continue
            if isinstance(x[k], float) and isinstance(y[k], float):
                assert abs(x[k] - y[k]) <= tol * max(abs(x[k]), 1e-6) + 1e-9, (k, x[k], y[k])
            else:
                assert x[k] == y[k], (k, x[k], y[k])


@pytest.mark.parametrize("parallel,finetune", [("ddp", "lora"), ("fsdp", "lora"),
                                               pytest.param("fsdp", "full", marks=pytest.mark.slow)])
def test_ppo_two_processes_equal_one(setup, parallel, finetune):
    """--parallel fsdp shards the weights (FSDP2): the same run, weights and Adam state (gathered into full
    tensors for the checkpoint) as one process. FSDP2 averaging gradients instead of summing the shares
    (its default; on gloo its own averaging has been wrong, pytorch issue 162338) would halve every step."""
    tag = f"ppo-{parallel}-{finetune}"
    more = ("--parallel", parallel, "--finetune", finetune)
    # full: minibatches of 3 rows, 2 micro-batches on rank 0 and 1 (then a zero-weight pass) on rank 1
    sizes = dict(batch="6", micro="1") if finetune == "full" else {}
    args = lambda out: ppo_args(setup, out, "share", *more, **sizes)
    p1 = one(args(setup / f"{tag}-1"))
    p2 = two(args(setup / f"{tag}-2"))
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert_same_run(setup / f"{tag}-1", setup / f"{tag}-2")
    assert p2.stderr.count("held-out reward before") == 1  # rank 0 prints, once


@pytest.mark.parametrize("algo", ["grpo", "trpo"])
def test_grpo_and_trpo_two_processes_equal_one(setup, algo):
    """GRPO (K = 2: groups whole on one rank and split over two), and TRPO: its gradient, every Fisher-vector
    product and every line-search evaluation summed over the ranks (each rank's micro-batches its rows). The
    conjugate gradient amplifies the float64 rounding of those sums (1e-15 after updates 1–2, ≤ 1e-8 after 3
    seen), so TRPO's runs are compared at 1e-6."""
    more = ["--samples-per-prompt", "2"] if algo == "grpo" else ["--micro-batch-size", "3"]
    args = lambda out: ["rlhf", "train", "--algo", algo, *ppo_args(setup, out)[2:], *more]
    p1, p2 = one(args(setup / f"{algo}1")), two(args(setup / f"{algo}2"))
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr[-1500:], p2.stderr[-1500:])
    assert_same_run(setup / f"{algo}1", setup / f"{algo}2", tol=1e-9 if algo == "grpo" else 1e-6)
    if algo == "trpo":  # the line search took a step on both (the comparison is not of two no-ops)
        assert all(r["ls_accepted"] for r in rows(setup / f"{algo}2")), rows(setup / f"{algo}2")


def test_ranks_without_rows_agree_and_too_few_rows_are_refused(setup, tmp_path):
    """ppo-kl with 1-row minibatches on 3 processes: every row lands on rank 0, so ranks 1 and 2 hold no row
    for the whole update and have no statistics of their own. The ranks agree on the statistics' keys (they
    used to issue different collectives and wait for gloo's 120 s timeout) and the run is the one of 1
    process. A batch, or a held-out set, smaller than the number of processes is one line on every rank."""
    more = ["--num-minibatches", "8", "--updates", "2"]
    args = lambda out: ["rlhf", "train", "--algo", "ppo-kl", *ppo_args(setup, out)[2:], *more]  # noqa: E731
    p1, p3 = one(args(tmp_path / "one")), two(args(tmp_path / "three"), procs=3, timeout=200)
    assert p1.returncode == 0 and p3.returncode == 0, (p1.stderr[-1500:], p3.stderr[-2500:])
    assert_same_run(tmp_path / "one", tmp_path / "three")
    for bad, field in ((["--batch-size", "2", "--num-minibatches", "1"], "batch_size"),
                       (["--eval-prompts", "2"], "eval_prompts")):
        p = two([*ppo_args(setup, tmp_path / field), *bad], procs=3, timeout=200)
        assert p.returncode != 0 and p.stderr.count(f"error: {field}: ") == 3, p.stderr[-2000:]
        assert not (tmp_path / field / "metrics.jsonl").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_two_processes_equal_one(setup, stage, parallel):
    """10 examples in batches of 3 (the last batch 1): the ranks hold 2 and 1 rows (the last batch 1 and 0), and
    with fsdp the rank with fewer runs zero-weight passes to keep step with the other's micro-batches."""
    data = setup / f"{stage}.jsonl"
    args = lambda out: ["rlhf", stage, "--model", str(setup / "model"), "--data", str(data), "--out", str(out),
                        "--batch-size", "3", "--micro-batch-size", "1", "--epochs", "2", "--lr", "1e-2",
                        "--chat-template", "off", "--lora-r", "2", "--dtype", "float64", "--parallel", parallel]
    a, b = setup / f"{stage}-{parallel}-1", setup / f"{stage}-{parallel}-2"
    p1, p2 = one(args(a)), two(args(b))
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr[-1500:], p2.stderr[-1500:])
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in ("loss", "grad_norm"):
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-9 * max(abs(x[k]), 1e-12), (k, x[k], y[k])
    ta = load_file(next((a / "checkpoints").glob("ckpt-*")) / "tensors.safetensors")
    tb = load_file(next((b / "checkpoints").glob("ckpt-*")) / "tensors.safetensors")
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize("stage,parallel", [("sft", "fsdp"), pytest.param("rm", "ddp", marks=pytest.mark.slow)])
def test_sft_and_rm_checkpoint_of_two_processes_resumes_on_one(setup, stage, parallel):
    """A 2-process run's mid-run checkpoint (step 3; with fsdp the weights and Adam moments gathered from the
    shards) resumed on ONE process after the run died there (its later checkpoint removed, its metrics lines past
    step 3 cut back) ends as the uninterrupted 1-process run."""
    data = setup / f"{stage}.jsonl"
    args = lambda out: ["rlhf", stage, "--model", str(setup / "model"), "--data", str(data), "--out", str(out),
                        "--batch-size", "3", "--micro-batch-size", "1", "--epochs", "2", "--lr", "1e-2",
                        "--chat-template", "off", "--lora-r", "2", "--dtype", "float64", "--parallel", parallel,
                        "--checkpoint-every", "3", "--keep-checkpoints", "5"]
    ref, died = setup / f"{stage}-ckpt-ref", setup / f"{stage}-ckpt-died"
    p1, p2 = one(args(ref)), two(args(died))
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr[-1500:], p2.stderr[-1500:])
    ckpts = sorted((died / "checkpoints").glob("ckpt-*"))
    steps = (3, 6, 8) if stage == "sft" else (3, 6)  # 4 (sft) or 3 (rm: one pair held out) steps per epoch, 2 epochs
    assert [c.name for c in ckpts] == [f"ckpt-{s:012d}" for s in steps]
    import shutil

    for c in ckpts[1:]:  # the run died after its step-3 checkpoint
        shutil.rmtree(c)
    r = one(["rlhf", stage, "--resume", str(died)])
    assert r.returncode == 0 and f"resuming {died} after step 3/" in r.stderr, r.stderr[-2000:]
    ra, rb = rows(ref), rows(died)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in ("loss", "grad_norm", "accuracy"):
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-9 * max(abs(x[k]), 1e-12), (k, x[k], y[k])
    ta = load_file(sorted((ref / "checkpoints").glob("ckpt-*"))[-1] / "tensors.safetensors")
    tb = load_file(sorted((died / "checkpoints").glob("ckpt-*"))[-1] / "tensors.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-9, atol=1e-12), k


def test_two_nodes_on_loopback_give_the_same_run(setup):
    port = str(_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "proxrl", *ppo_args(setup, setup / "nodes")]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for e in errs]
    if not (setup / "ppo1").exists():
        assert one(ppo_args(setup, setup / "ppo1")).returncode == 0
    assert_same_run(setup / "ppo1", setup / "nodes")


def test_nan_on_rank1_only_stops_both_ranks_with_the_same_line(setup):
    flag = setup / "nan-flag"
    flag.write_text("1")
    t0 = time.perf_counter()
    p = two(ppo_args(setup, setup / "nan", "nan_on_rank1"), timeout=120, NAN_FLAG=str(flag))
    took = time.perf_counter() - t0
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ") or "]:error: " in l]
    assert p.returncode != 0 and took < 90, (p.returncode, took)
    assert errors and all("NaN" in l or "nan" in l for l in errors), p.stderr[-2000:]
    assert any("held-out prompts" in l or "at update" in l for l in errors), errors
    # the workers print one line each (torchrun's launcher adds its own report of the failed child)
    assert "[rank0]: Traceback" not in p.stderr and "[rank1]: Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("error: reward function") == 2, p.stderr[-2000:]  # both ranks, the same line


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_checkpoint_of_two_processes_resumes_on_one_and_ends_identical(setup, parallel):
    """SIGTERM to the launcher after the first update: every rank finishes the update, rank 0 checkpoints,
    all exit 143; the run then resumes on ONE process and ends identical to the uninterrupted 2-process run
    (with fsdp the checkpoint holds the full tensors gathered from the shards; the reference run is ddp)."""
    out = setup / f"stopped-{parallel}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), "-m", "proxrl", *ppo_args(setup, out, "slow", "--checkpoint-every", "1",
                                                                    "--parallel", parallel)]
    proc = subprocess.Popen(cmd, env=_env(SLOW="1.0"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "checkpoints").glob("ckpt-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert list((out / "checkpoints").glob("ckpt-*")), err[-2000:]
    r = one(["rlhf", "ppo", "--resume", str(out), "--reward", f"{setup / 'reward.py'}:slow"])
    assert r.returncode == 0, r.stderr[-2000:]
    ref = setup / "ref-slow"
    if not ref.exists():
        assert two(ppo_args(setup, ref, "slow")).returncode == 0
    assert_same_run(ref, out)


def test_killed_worker_is_restarted_and_the_run_ends_identical(setup):
    """kill -9 of one worker under --max-restarts 1: torchrun restarts both, the run resumes from its last
    checkpoint by itself, and ends identical to the uninterrupted run."""
    out = setup / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "proxrl",
           *ppo_args(setup, out, "slow", "--checkpoint-every", "1")]
    proc = subprocess.Popen(cmd, env=_env(SLOW="1.0"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "checkpoints").glob("ckpt-*")):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", f"proxrl rlhf ppo.*{out}"], capture_output=True, text=True).stdout.split()
    workers = [w for w in workers if int(w) != proc.pid]
    assert workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, err[-2500:]
    ref = setup / "ref-slow"
    if not ref.exists():
        assert two(ppo_args(setup, ref, "slow")).returncode == 0
    assert_same_run(ref, out)


def test_single_process_commands_refuse_torchrun_in_one_line(setup):
    p = two(["ladder", "--env", "CartPole-v1", "--steps", "4096", "--out", str(setup / "gym")], timeout=120)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: torchrun:")]
    assert p.returncode != 0 and len(errors) == 2, p.stderr[-2000:]
    assert not (setup / "gym").exists()


@pytest.mark.parametrize("env,algo,update", [("CartPole-v1", "ppo-clip", "replicate"), ("CartPole-v1", "ppo-clip", "split"),
                                             ("CartPole-v1", "trpo", "replicate"), ("Pendulum-v1", "ppo-clip", "replicate")])
def test_gym_two_processes_equal_one(tmp_path, env, algo, update):
    """Observation and reward normalisation, 4 per-env (sync) envs: 2 ranks × 2 envs equal one process with 4
    envs. ``--dist-update replicate`` (ppo-clip, trpo; discrete and continuous actions) is the same run bit for
    bit — metrics, weights, Adam moments, normalisers: each rank evaluates its rows in a batch of the run's
    shape and computes the update on the gathered rollout as one process does. ``split`` sums the ranks'
    gradients of each minibatch, a different summation order: equal up to float32 rounding (≤ 1e-4 relative
    allowed, seen ≤ 7e-7)."""
    args = lambda out: gym_args(out, "--dist-update", update, algo=algo, env=env)  # noqa: E731
    p1, p2 = one(args(tmp_path / "one")), two(args(tmp_path / "two"))
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr[-1500:], p2.stderr[-2500:])
    # the result: one JSON line on stdout (rank 0's), as on one process
    assert len(p2.stdout.splitlines()) == 1 and json.loads(p2.stdout)["run_dir"] == str(tmp_path / "two")
    ta, tb = _last_tensors(tmp_path / "one"), _last_tensors(tmp_path / "two")
    if update == "replicate":
        assert gym_rows(tmp_path / "one") == gym_rows(tmp_path / "two")
        shared = [k for k in ta if k.split("/")[0] in ("policy", "optimizer", "obs_rms", "ret_rms")
                  and k != "ret_rms/discounted"]  # one row per env: the ranks' rows, below
        assert len(shared) > 8 and all(torch.equal(ta[k], tb[k]) for k in shared), \
            [k for k in shared if not torch.equal(ta[k], tb[k])][:5]
        for k in ("ret_rms/discounted", "runner/raw_obs", "runner/ep_return", "env/vec._observations"):
            assert torch.equal(ta[k], torch.cat([tb[f"rank0/{k}"], tb[f"rank1/{k}"]])), k
    else:
        assert_close_gym_rows(rows(tmp_path / "one"), rows(tmp_path / "two"), 6)
        for k in (k for k in ta if k.startswith("policy/")):
            assert float((ta[k] - tb[k]).abs().max() / ta[k].abs().max().clamp(min=1e-30)) <= 1e-4, k
    import proxrl

    proxrl.load(tmp_path / "two")  # a 2-process checkpoint loads like any other


def test_fsdp_with_fp16_is_refused_in_one_line():
    from proxrl.errors import ConfigError
    from proxrl.lm.config import PPOConfig

    with pytest.raises(ConfigError) as e:
        PPOConfig(parallel="fsdp", precision="fp16").validate_model()
    assert e.value.field == "parallel" and "fp16" in str(e.value) and "\n" not in str(e.value)


COLLECTIVES = '''
import torch
from proxrl.run.dist import context, RemoteError
d = context("cpu")
r = d.rank
# any shapes and dtypes in two collectives; rank 1 sends an empty tensor
parts = d.gather_tensors([torch.arange(3 + r, dtype=torch.long) * 2**40, torch.full((r, 2), r > 0),
                          torch.tensor(0.1, dtype=torch.bfloat16) * (r + 1)])
assert [p.tolist() for p in parts[0]] == [[0, 2**40, 2**41], [0, 2**40, 2**41, 3 * 2**40]], parts[0]
assert parts[1][0].shape == (0, 2) and parts[1][1].tolist() == [[True, True]] and parts[1][1].dtype == torch.bool
assert [p.dtype for p in parts[2]] == [torch.bfloat16] * 2 and float(parts[2][1]) == float(torch.tensor(0.2, dtype=torch.bfloat16))
# padded rows (LM responses of different lengths), and the one-collective path for known row counts
g = d.gather_rows(torch.ones(1 + r, 2 + r), pad_value=-1)
assert g.tolist() == [[1, 1, -1], [1, 1, 1], [1, 1, 1]], g
assert d.gather_rows(torch.full((2 - r, 2), float(r)), rows=[2, 1]).tolist() == [[0, 0], [0, 0], [1, 1]]
# the fused minibatch step: gradients and statistics summed, in place
flat = torch.full((4,), float(r + 1))
st = d.sum_step(None, flat, {"loss": torch.tensor(r + 0.5), "note": "x"}, ["loss"])
assert flat.tolist() == [3.0] * 4 and float(st["loss"]) == 2.0 and st["note"] == "x"
# gradients: one held by rank 1 only is summed onto every rank; one held by no rank stays None (as on one
# process, where Adam skips it: a zero gradient gave it optimizer state and steps that depend on the ranks)
a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
a.grad = torch.full((2,), 1.5) if r == 1 else None
d.all_reduce_grads([a, b])
assert a.grad.tolist() == [1.5, 1.5] and b.grad is None, (a.grad, b.grad)
# an error on rank 1 only (or a missing statistic) stops both ranks with rank 1's line, no hang
for bad in ({"error": ValueError("loss: NaN at update 7")}, {"stats": {}}):
    try:
        d.sum_step(bad.get("error") if r == 1 else None, flat, bad.get("stats", {"loss": torch.tensor(1.0)})
                   if r == 1 else {"loss": torch.tensor(1.0)}, ["loss"])
    except (ValueError, RuntimeError, RemoteError) as e:
        print(f"rank {r}: {e}", flush=True)
    else:
        raise SystemExit("no error")
print(f"rank {r}: ok", flush=True)
'''


def test_collectives_pack_any_tensors_and_agree_on_errors(tmp_path):
    """The collectives the gym's per-step and per-minibatch exchanges rest on: one buffer for any number of
    tensors of any dtype (exact round trip), rows of known counts in one collective, and the fused
    minibatch step whose error flag travels with the gradients (a failing rank's line reaches every rank)."""
    (tmp_path / "c.py").write_text(COLLECTIVES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "c.py")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        assert f"rank {r}: loss: NaN at update 7" in p.stdout
        assert f"rank {r}: a minibatch step returned no statistic 'loss'" in p.stdout
        assert f"rank {r}: ok" in p.stdout


def test_gym_checkpoint_of_two_processes_resumes_on_two_exactly_and_on_one(tmp_path):
    """A 2-process gym run (per-rank env state, normalisers, the deferred reward scaling) stopped after 3
    updates resumes on 2 processes bit-identical to the uninterrupted 6-update run, and on 1 process — the
    two ranks' envs dealt to one (physics, counters, generators, episode sums, pending resets) — it ends the
    same run bit for bit as well."""
    args = lambda out, steps: gym_args(out, "--no-anneal-lr", steps=steps, seed=3)  # noqa: E731
    ref = two(args(tmp_path / "ref", 3072))
    assert ref.returncode == 0, ref.stderr[-2000:]
    p = two(args(tmp_path / "run", 1536))
    assert p.returncode == 0, p.stderr[-2000:]
    shutil.copytree(tmp_path / "run", tmp_path / "run-on-1")
    r = two(["train", "--resume", str(tmp_path / "run"), "--steps", "3072"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(rows(tmp_path / "ref")) == 6 and gym_rows(tmp_path / "ref") == gym_rows(tmp_path / "run")
    ta, tb = _last_tensors(tmp_path / "ref"), _last_tensors(tmp_path / "run")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    r1 = one(["train", "--resume", str(tmp_path / "run-on-1"), "--steps", "3072"])
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert "warning" not in r1.stderr, r1.stderr
    assert gym_rows(tmp_path / "run-on-1") == gym_rows(tmp_path / "ref")
    t1 = _last_tensors(tmp_path / "run-on-1")
    assert all(torch.equal(t1[k], ta[k]) for k in ta if k.startswith(("policy/", "optimizer/")))
    # the 4 envs' physics after update 6: rank 0's 2 then rank 1's 2 on 2 processes, the same 4 on 1
    assert torch.equal(t1["env/vec._observations"],
                       torch.cat([ta["rank0/env/vec._observations"], ta["rank1/env/vec._observations"]]))


def test_gym_checkpoint_of_one_process_resumes_on_two(tmp_path):
    """The other way: a 1-process run (per-env sync envs) checkpointed after 3 updates continues on 2
    processes bit for bit as the uninterrupted 1-process run; a numpy-vectorised run (one generator for all its envs)
    is refused on 2 in one line naming why and the fix."""
    args = lambda out, steps: gym_args(out, "--no-anneal-lr", steps=steps, seed=4)  # noqa: E731
    assert one(args(tmp_path / "ref", 3072)).returncode == 0
    assert one(args(tmp_path / "run", 1536)).returncode == 0
    r = two(["train", "--resume", str(tmp_path / "run"), "--steps", "3072"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(rows(tmp_path / "ref")) == 6 and gym_rows(tmp_path / "run") == gym_rows(tmp_path / "ref")
    numpy_args = [a if a != "sync" else "auto" for a in args(tmp_path / "np", 1536)]
    assert one(numpy_args).returncode == 0
    p = two(["train", "--resume", str(tmp_path / "np"), "--steps", "3072"])
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode != 0 and len(set(lines)) == 1, p.stderr[-2000:]
    assert "checkpointed on 1 process(es) and cannot resume on 2" in lines[0] and "resume it on 1" in lines[0]


def test_three_processes_equal_one(setup, tmp_path):
    """Not only 2: 3 processes with unequal shares — the LM batch of 8 rows (3 + 3 + 2, minibatches of 4 split
    2 + 1 + 1) and 5 gym envs (2 + 2 + 1, split update) — compute the run of one process."""
    lm = lambda out: ppo_args(setup, out, "share", "--parallel", "ddp", "--finetune", "lora")  # noqa: E731
    ref = setup / "ppo-ddp-lora-1"  # test_ppo_two_processes_equal_one's 1-process run (the same arguments)
    if not ref.exists():
        assert one(lm(ref)).returncode == 0
    p3 = two(lm(tmp_path / "lm3"), procs=3)
    assert p3.returncode == 0, p3.stderr[-2000:]
    assert_same_run(ref, tmp_path / "lm3")
    gym = lambda out: gym_args(out, "--dist-update", "split", steps=1920, envs=5)  # noqa: E731
    g1, g3 = one(gym(tmp_path / "g1")), two(gym(tmp_path / "g3"), procs=3)
    assert g1.returncode == 0 and g3.returncode == 0, (g1.stderr[-1500:], g3.stderr[-2500:])
    assert_close_gym_rows(rows(tmp_path / "g1"), rows(tmp_path / "g3"), 3)  # seen ≤ 6e-6 relative
