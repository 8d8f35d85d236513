"""Issue 14, "everyday use without surprises": console output, run directories, user code, the smaller
tools, action bounds and environment arguments. Every bad input is one line ``error: <field>: …`` on
stderr and exit status 2, no traceback.

Most cases call ``proxrl.cli.main`` in-process (what ``python -m proxrl`` runs); the console-output
cases run real ``python -m proxrl`` subprocesses (a pipe, and a pseudo-terminal for stderr).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--num-envs", "2", "--num-steps", "16", "--preset", "none", "--num-minibatches", "2",
        "--update-epochs", "1", "--checkpoint-every", "1"]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from proxrl.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, field: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and field in lines[0], (field, lines[0])
    return lines[0]


def train(capsys, out, *extra: str, steps: int = 64) -> tuple[int, str, str]:
    return cli(capsys, "train", "--progress", "off", *TINY, "--steps", str(steps), "--out", str(out), *extra)


# ---------------------------------------------------------------------------- 1. console output
def _json_stdout(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1, stdout  # nothing but the result on stdout
    return json.loads(lines[0])


def test_stdout_is_json_in_a_pipe(tmp_path):
    """``proxrl train … > out.json`` (stdout a pipe): stdout is exactly one JSON line; progress (plain
    lines, 'auto' off a terminal) is on stderr."""
    p = subprocess.run([sys.executable, "-m", "proxrl", "train", *TINY, "--steps", "64", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert _json_stdout(p.stdout)["steps"] == 64
    assert "ppo-clip CartPole-v1" in p.stderr and "eta" in p.stderr  # the progress lines went to stderr


def test_stdout_is_json_with_stderr_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal (the rich bar is drawn there), stdout redirected: stdout is still one
    JSON line and the bar's escape codes never reach it."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "proxrl", "train", *TINY, "--steps", "64", "--out",
                              str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=slave, env=_env(TERM="xterm"))
        os.close(slave)
        chunks = []
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not b:
                break
            chunks.append(b)
        out, _ = p.communicate(timeout=300)
    finally:
        os.close(master)
    assert p.returncode == 0
    tty_text = b"".join(chunks).decode("utf-8", "replace")
    assert "ppo-clip CartPole-v1" in tty_text  # the bar was drawn on the terminal
    assert _json_stdout(out.decode())["steps"] == 64


def test_quiet_turns_progress_off(tmp_path, capsys):
    rc, out, err = cli(capsys, "train", "--quiet", *TINY, "--steps", "64", "--out", str(tmp_path / "r"))
    assert rc == 0 and err == "" and _json_stdout(out)["steps"] == 64
    assert json.loads((tmp_path / "r" / "config.json").read_text())["progress"] == "off"
    rc, _, err = cli(capsys, "train", "-q", "--progress", "on", "--out", str(tmp_path / "q"))
    one_line(rc, err, "quiet")


# ---------------------------------------------------------------------------- 2. run directories
def test_existing_run_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(capsys, run, steps=96)[0] == 0  # 3 updates
    before = (run / "metrics.jsonl").read_text()
    one_line(*train(capsys, run)[::2], "out")
    assert (run / "metrics.jsonl").read_text() == before  # refused before anything was touched
    # --overwrite with an env that cannot be made: the old run is left as it was, a new --out is not created
    one_line(*train(capsys, run, "--overwrite", "--env", "NoSuchEnv-v9")[::2], "env")
    assert (run / "metrics.jsonl").read_text() == before
    one_line(*train(capsys, tmp_path / "new", "--env", "NoSuchEnv-v9")[::2], "env")
    assert not (tmp_path / "new").exists()
    rc, out, err = train(capsys, run, "--overwrite", "--seed", "5", steps=32)  # 1 update
    assert rc == 0, err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-000000000001"]  # old ones removed
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    # a non-empty directory that holds no run is used as it is
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README").write_text("mine")
    assert train(capsys, other)[0] == 0 and (other / "README").read_text() == "mine"


def test_a_run_still_running_is_never_written_by_a_second_process(tmp_path, capsys):
    """A second process on the directory of a run that is still running — the same --out, --overwrite, --resume
    — is refused in one line (it used to interleave: the resume replaced metrics.jsonl under the first, both
    wrote checkpoints); the running run goes on untouched and stops cleanly."""
    import signal
    import time

    run = tmp_path / "r"
    child = subprocess.Popen([sys.executable, "-m", "proxrl", "train", "--progress", "off", *TINY, "--steps",
                              "10000000", "--out", str(run)], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((run / "checkpoints").glob("ckpt-*")) and time.time() < deadline:
            time.sleep(0.2)
        assert list((run / "checkpoints").glob("ckpt-*")), child.stderr.read() if child.poll() is not None else ""
        config = (run / "config.json").read_text()
        one_line(*cli(capsys, "train", "--progress", "off", "--resume", str(run))[::2], "resume")
        one_line(*train(capsys, run, "--overwrite")[::2], "out")
        one_line(*train(capsys, run)[::2], "out")
        assert (run / "config.json").read_text() == config
        n = len((run / "metrics.jsonl").read_text().splitlines())
        time.sleep(1.0)
        assert len((run / "metrics.jsonl").read_text().splitlines()) > n  # still the running run's file
    finally:
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == list(range(1, len(rows) + 1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"ckpt-{len(rows):012d}"
    # once it has ended the directory is free: resumed in this process
    rc, out, err = cli(capsys, "train", "--progress", "off", "--resume", str(run), "--steps", str(32 * (len(rows) + 1)))
    assert rc == 0, err


RESUME_CHANGES = [
    (["--lr", "0.1"], "lr"),
    (["--env", "Acrobot-v1"], "env"),
    (["--algo", "trpo"], "algo"),
    (["--num-envs", "4"], "num_envs"),
    (["--no-anneal-lr"], "anneal_lr"),
    (["--hidden", "32"], "hidden"),
    (["--seed", "9"], "seed"),
    (["--gamma=0.5"], "gamma"),
    (["--obs-norm"], "obs_norm"),
    (["--preset", "auto"], "preset"),
    (["--env-kwargs", '{"sutton_barto_reward": true}'], "env_kwargs"),
    (["--out", "/elsewhere"], "out"),
    (["--overwrite"], "overwrite"),
    (["--steps", "32"], "steps"),  # below what the run has done
]


def test_resume_refuses_changes_and_extends_steps(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(capsys, run, steps=64)[0] == 0
    metrics = (run / "metrics.jsonl").read_text()
    for extra, field in RESUME_CHANGES:
        rc, out, err = cli(capsys, "train", "--progress", "off", "--resume", str(run), *extra)
        one_line(rc, err, field)
        assert out == ""
    assert (run / "metrics.jsonl").read_text() == metrics  # none of them touched the run
    # the same values as saved are not a change; --steps raises the budget; how often and how many checkpoints
    # are written may change (no result depends on them)
    rc, out, err = cli(capsys, "train", "--progress", "off", "--resume", str(run), "--num-envs", "2",
                       "--preset", "none", "--steps", "128", "--checkpoint-every", "3", "--keep-checkpoints", "1")
    assert rc == 0, err
    assert _json_stdout(out)["steps"] == 128 and len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert len(list((run / "checkpoints").glob("ckpt-*"))) == 1  # keep 1
    assert metrics in (run / "metrics.jsonl").read_text()


def test_resume_says_when_metrics_lines_the_checkpoint_covers_are_gone(tmp_path, capsys):
    """A line cut after the checkpoint (a kill) is dropped without a word; a cut or edited line the checkpoint
    covers used to vanish silently from the resumed metrics (a gap at that update): now one warning names it."""
    run = tmp_path / "r"
    assert train(capsys, run, "--checkpoint-every", "4", steps=256)[0] == 0  # 8 updates, checkpoint at 8
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"update": 9, "step"')  # a line cut by a kill
    rc, out, err = cli(capsys, "train", "--progress", "off", "--resume", str(run), "--steps", "288")
    assert rc == 0 and "warning" not in err, err
    metrics.write_text(metrics.read_text()[:-30])  # the last line (update 9, under the checkpoint) cut by hand
    rc, out, err = cli(capsys, "train", "--progress", "off", "--resume", str(run), "--steps", "320")
    assert rc == 0, err
    warn = [l for l in err.splitlines() if l.startswith("warning: ")]
    assert len(warn) == 1 and "metrics.jsonl" in warn[0] and "9..9" in warn[0], err
    assert [json.loads(l)["update"] for l in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6, 7, 8, 10]


def test_resume_through_the_api_refuses_changes(tmp_path):
    import proxrl

    run = tmp_path / "r"
    proxrl.train(env="CartPole-v1", steps=64, num_envs=2, num_steps=16, num_minibatches=2, preset="none",
                 out=str(run), progress="off")
    with pytest.raises(proxrl.ConfigError, match="^lr: "):
        proxrl.train(resume=str(run), lr=0.5, progress="off")
    with pytest.raises(proxrl.ConfigError, match="^clip_coef: "):
        proxrl.train(proxrl.TrainConfig(resume=str(run), clip_coef=0.3))
    res = proxrl.train(resume=str(run), steps=96, progress="off")
    assert res.metrics[-1]["step"] == 96


def test_bad_out_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_line(*train(capsys, f)[::2], "out")                   # a file
    one_line(*train(capsys, f / "sub")[::2], "out")           # under a file
    one_line(*cli(capsys, "train", "--resume", str(f))[::2], "resume")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            one_line(*train(capsys, ro / "run")[::2], "out")
        finally:
            ro.chmod(0o700)


def test_out_inside_another_runs_checkpoints_is_refused(tmp_path, capsys):
    """A run written inside another run's checkpoints/ (or a checkpoint of it, or its tb/) was silently
    deleted by that run's rotation or --overwrite; now refused in one line, also through a symlink. A folder
    of a run beside those, and a folder named checkpoints outside any run, are fine."""
    run = tmp_path / "r"
    assert train(capsys, run, steps=64)[0] == 0
    ckpt = checkpoint_dirs(run)[-1]
    (tmp_path / "link").symlink_to(run / "checkpoints")
    for out in (ckpt / "nested", run / "checkpoints", run / "tb", tmp_path / "link" / "x"):
        one_line(*train(capsys, out, steps=32)[::2], "out")
        assert not (out / "config.json").exists()
    for out in (run / "notes", tmp_path / "plain" / "checkpoints"):
        assert train(capsys, out, steps=32)[0] == 0
    assert train(capsys, run, "--overwrite", steps=32)[0] == 0
    assert (run / "notes" / "config.json").is_file()


def checkpoint_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("ckpt-"))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_run_files_follow_the_umask(tmp_path, capsys, mask):
    old = os.umask(mask)
    try:
        assert train(capsys, tmp_path / "r", steps=32)[0] == 0
    finally:
        os.umask(old)
    run = tmp_path / "r"
    files = [run / "config.json", run / "metrics.jsonl"] + list((run / "checkpoints").rglob("*"))
    assert len(files) >= 5
    for p in files:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode), oct(want))


# ---------------------------------------------------------------------------- 3. user code
class _Rollout:
    prompts = ["a", "b"]
    responses = ["x", "y"]

    def __len__(self):
        return 2


def _scorer(fn):
    from proxrl.lm.rollout import Scorer

    s = Scorer.__new__(Scorer)  # the function path only: no model needed
    s.fn, s.rm, s.name = fn, None, f"reward function {fn.__name__!r}"
    return s


GOOD_REWARDS = [[1.0, 2], (0.5, np.float32(1.0)), np.array([1.0, 2.0]), [np.int64(1), 0]]
BAD_REWARDS = [["0.5", 1.0], {"a": 1.0, "b": 2.0}, [True, 1.0], [np.bool_(True), 0.0], "12", None, 1.0,
               [{"a": 1}, 2.0], [None, 1.0], [[1.0], 2.0], np.array([True, False]), np.array(["1", "2"]),
               np.ones((2, 1)), {1.0, 2.0}, [1.0], [1.0, 2.0, 3.0]]


def test_a_nonfinite_reward_names_the_response_by_its_place_in_the_whole_batch():
    """On several processes a rank scores rows 6–8 of a batch of 9: a NaN for its first row is response 6 of the
    batch (it said "3 of 3 responses … response 0", the rank's own numbering, on 3 processes)."""
    from proxrl.errors import NumericsError

    class Shard(_Rollout):
        rows = slice(6, 8)

    nan = _scorer(lambda p, r: [float("nan"), 1.0])
    with pytest.raises(NumericsError, match=r"for 1 of 2 responses 6–7 at update 1 \(first: response 6, 'x'\)"):
        nan(Shard(), " at update 1")
    with pytest.raises(NumericsError, match=r"for 1 of 2 responses at update 1 \(first: response 0, 'x'\)"):
        nan(_Rollout(), " at update 1")  # one process: as before


def test_reward_values_only_real_numbers():
    from proxrl.errors import ProxrlError

    for out in GOOD_REWARDS:
        assert _scorer(lambda p, r, out=out: out)(_Rollout(), " at update 3").tolist() == [float(x) for x in out]
    refused = 0
    for out in BAD_REWARDS:
        def score(p, r, out=out):
            return out
        with pytest.raises(ProxrlError) as e:
            _scorer(score)(_Rollout(), " at update 3")
        msg = str(e.value)
        assert msg.startswith("reward: ") and "'score'" in msg and "at update 3" in msg and "\n" not in msg, msg
        refused += 1
    assert refused == len(BAD_REWARDS) == 16


def test_reward_function_that_raises_is_one_line():
    from proxrl.errors import ConfigError

    def flaky(prompts, responses):
        return {}["missing"]

    with pytest.raises(ConfigError) as e:
        _scorer(flaky)(_Rollout(), " at update 7")
    msg = str(e.value)
    assert "'flaky' raised KeyError at update 7" in msg and "\n" not in msg and e.value.__cause__ is None


@pytest.mark.parametrize("source,expect", [
    ("def f(p, r):\n    return [1.0 for x in p\n", "syntax error at"),
    ("raise RuntimeError('no sentiment model')\n", "raised RuntimeError: no sentiment model"),
    ("import no_such_module_xyz\n", "cannot import"),
    ("g = 1\n", "no callable 'f'"),
])
def test_reward_file_defects_are_one_line(tmp_path, source, expect):
    from proxrl.errors import ConfigError
    from proxrl.lm.rollout import load_reward_fn

    path = tmp_path / "rew.py"
    path.write_text(source)
    with pytest.raises(ConfigError) as e:
        load_reward_fn(f"{path}:f")
    msg = str(e.value)
    assert msg.startswith("reward: ") and expect in msg and "\n" not in msg, msg
    if "syntax" in expect:
        assert f"{path}:2" in msg  # file and line


def _cartpole():
    import gymnasium as gym

    return gym.make("CartPole-v1")


@pytest.mark.parametrize("defect", ["factory raises", "factory raises later", "reset raises", "step raises"])
def test_env_factory_that_raises_is_one_line(tmp_path, defect):
    import gymnasium as gym

    import proxrl

    calls = []

    def factory():
        calls.append(1)
        if defect == "factory raises" or (defect == "factory raises later" and len(calls) > 1):
            raise RuntimeError("simulator licence not found")
        env = _cartpole()
        if defect == "reset raises":
            env.reset = lambda **kw: 1 / 0
        if defect == "step raises":
            env.step = lambda a: [][1]
        return env

    with pytest.raises(proxrl.ProxrlError) as e:
        proxrl.train(env="Mine-v0", env_factory=factory, steps=64, num_envs=2, num_steps=32, num_minibatches=1,
                     out=str(tmp_path / "run"), progress="off", preset="none")
    msg = str(e.value)
    assert "\n" not in msg and ".factory' raised" in msg, msg
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written: a retry is not refused
    assert gym  # (imported for the env)


# ---------------------------------------------------------------------------- 4. smaller tools
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    import proxrl

    out = tmp_path_factory.mktemp("small") / "run"
    proxrl.train(env="CartPole-v1", steps=256, num_envs=2, num_steps=32, num_minibatches=2, preset="none",
                 out=str(out), progress="off")
    return out


def test_plot_bad_inputs_one_line(tmp_path, capsys, small_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    (tmp_path / "adir.png").mkdir()
    cases = [
        (["--metric", "nope"], "metric"),
        (["--metric", "beta"], "metric"),  # logged, but null in every line of a ppo-clip run
        (["--out", str(tmp_path / "c.xyz")], "out"),
        (["--out", str(tmp_path / "c")], "out"),
        (["--out", str(tmp_path / "adir.png")], "out"),
        (["--out", "/dev/null/c.png"], "out"),
    ]
    for extra, field in cases:
        one_line(*cli(capsys, "plot", str(small_run), *extra)[::2], field)
    one_line(*cli(capsys, "plot", str(empty), "--out", str(tmp_path / "e.png"))[::2], "metrics.jsonl")
    assert not list(tmp_path.glob("*.xyz")) and not (tmp_path / "c").exists() and not (tmp_path / "e.png").exists()
    rc, out, err = cli(capsys, "plot", str(small_run), "--out", str(tmp_path / "ok.svg"), "--metric", "entropy")
    assert rc == 0 and (tmp_path / "ok.svg").stat().st_size > 1000, err


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), "1.5"])
def test_eval_bad_seed_one_line(capsys, small_run, seed):
    one_line(*cli(capsys, "eval", str(small_run), "--seed", seed)[::2], "seed")


def test_ladder_validated_before_any_work(tmp_path, capsys):
    out = tmp_path / "lad"
    line = one_line(*cli(capsys, "ladder", "--steps", "100", "--out", str(out))[::2], "steps")
    assert "rung" in line and "or more" in line
    assert not out.exists()  # refused before any directory or worker
    one_line(*cli(capsys, "ladder", "--algos", "ppo-clip", "--seeds", "1", "--steps", "512", "--eval-episodes",
                  "0", "--out", str(out))[::2], "eval_episodes")
    (tmp_path / "f").write_text("x")
    one_line(*cli(capsys, "ladder", "--algos", "ppo-clip", "--seeds", "1", "--steps", "4096",
                  "--out", str(tmp_path / "f"))[::2], "out")
    run = out / "ppo-clip" / "seed1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    one_line(*cli(capsys, "ladder", "--algos", "ppo-clip", "--seeds", "1", "--steps", "4096",
                  "--out", str(out))[::2], "out")
    # a rung given twice (two jobs, one directory); a file where a run directory goes
    one_line(*cli(capsys, "ladder", "--algos", "pg", "pg", "--seeds", "1", "--steps", "4096",
                  "--out", str(tmp_path / "twice"))[::2], "algos")
    (tmp_path / "lad2" / "pg").mkdir(parents=True)
    (tmp_path / "lad2" / "pg" / "seed1").write_text("x")
    one_line(*cli(capsys, "ladder", "--algos", "pg", "--seeds", "1", "--steps", "4096", "--overwrite",
                  "--out", str(tmp_path / "lad2"))[::2], "out")
    # an --out that is itself a run: said so, not "continue it with --resume" (a ladder has none) nor
    # "replace it with --overwrite" (which the ladder refused again with the same line)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    for extra in ([], ["--overwrite"]):
        line = one_line(*cli(capsys, "ladder", "--algos", "pg", "--seeds", "1", "--steps", "4096", *extra,
                             "--out", str(tmp_path / "run"))[::2], "out")
        assert "itself a run directory" in line and "--resume" not in line, line



def test_ladder_refuses_an_env_it_cannot_train_on_before_any_run(tmp_path, capsys):
    """FrozenLake (Discrete observations) used to start every rung × seed, each failing on the env, and left an
    empty --out: "0 of 21 runs finished, their directories kept"."""
    out = tmp_path / "lad"
    line = one_line(*cli(capsys, "ladder", "--env", "FrozenLake-v1", "--steps", "4096", "--out", str(out))[::2], "env")
    assert "Discrete(16) is not supported" in line and "runs" not in line
    assert not out.exists()



def test_eval_of_a_run_trained_with_an_env_factory_says_so(tmp_path, capsys):
    """``proxrl eval`` of a run made with ``proxrl.train(env_factory=..., env="CartPole")`` answered "unknown
    Gymnasium environment id 'CartPole' (did you mean CartPole-v1?)", pointing at another env."""
    import gymnasium as gym

    import proxrl

    run = proxrl.train(env="CartPole", env_factory=lambda: gym.make("CartPole-v1"), algo="pg", steps=64,
                       num_envs=1, num_steps=64, out=str(tmp_path / "r"), progress="off", preset="none").run_dir
    line = one_line(*cli(capsys, "eval", str(run))[::2], "env")
    assert "env_factory" in line and "did you mean" not in line
    assert proxrl.evaluate(run, episodes=1, env_factory=lambda: gym.make("CartPole-v1"))["episodes"] == 1


def test_ladder_worker_error_is_one_line(monkeypatch):
    """An error inside a worker comes back as one ProxrlError line (not BrokenProcessPool)."""
    from proxrl.gym import ladder

    res = ladder._one("CartPole-v1", "ppo-clip", 1, 10, "/dev/null/x", 1)
    assert set(res) == {"algo", "seed", "error"} and "steps" in res["error"]
    import pickle

    assert pickle.loads(pickle.dumps(res)) == res


# ---------------------------------------------------------------------------- 5. action bounds
@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    import proxrl

    out = tmp_path_factory.mktemp("pend") / "run"
    proxrl.train(env="Pendulum-v1", algo="ppo-clip", steps=128, num_envs=2, num_steps=32, num_minibatches=2,
                 preset="none", out=str(out), progress="off")
    return out


def _push_out_of_bounds(agent):
    import torch

    with torch.no_grad():
        agent.policy.actor[-1].bias.fill_(25.0)  # a mean far above Pendulum's +2
        if hasattr(agent.policy, "log_std"):
            agent.policy.log_std.fill_(2.0)


def test_load_act_respects_box_bounds(pendulum_run):
    import proxrl
    from proxrl.run import checkpoint

    state = json.loads((checkpoint.latest(pendulum_run / "checkpoints") / "state.json").read_text())
    assert state["action_space"] == {"shape": [1], "low": [-2.0], "high": [2.0]}
    agent = proxrl.load(pendulum_run)
    _push_out_of_bounds(agent)
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    for det in (True, False):
        a = agent.act(obs, deterministic=det)
        assert a.shape == (64, 1) and (a <= 2.0).all() and (a >= -2.0).all()
    assert agent.act(obs[0]).shape == (1,)


def test_old_checkpoint_without_bounds_still_loads_and_clips(pendulum_run, tmp_path):
    import shutil

    import proxrl
    from proxrl.run import checkpoint

    old = tmp_path / "old"
    shutil.copytree(pendulum_run, old)
    path = checkpoint.latest(old / "checkpoints") / "state.json"
    state = json.loads(path.read_text())
    del state["action_space"]
    path.write_text(json.dumps(state))
    agent = proxrl.load(old)  # bounds read from the registered env instead
    _push_out_of_bounds(agent)
    assert (agent.act(np.zeros((4, 3), np.float32)) <= 2.0).all()
    assert np.isfinite(proxrl.evaluate(old, episodes=2)["mean_return"])


# ---------------------------------------------------------------------------- 6. env kwargs
def test_env_kwargs_reach_the_env_and_config(tmp_path, capsys):
    from proxrl.gym.envs import make_vec_env

    vec = make_vec_env("Pendulum-v1", 2, "sync", {"g": 3.5})
    try:
        assert [e.unwrapped.g for e in vec.envs] == [3.5, 3.5]
    finally:
        vec.close()
    rc, out, err = cli(capsys, "train", "--progress", "off", "--env", "Pendulum-v1", *TINY, "--steps", "32",
                       "--env-kwargs", '{"g": 3.5}', "--out", str(tmp_path / "p"))
    assert rc == 0, err
    assert json.loads(json.loads((tmp_path / "p" / "config.json").read_text())["env_kwargs"]) == {"g": 3.5}
    rc, out, err = cli(capsys, "eval", str(tmp_path / "p"), "--episodes", "1")
    assert rc == 0, err


ENV_KWARGS_BAD = ["{g: 1}", "[1, 2]", '"text"', "3", '{"no_such_argument": 1}', "{", "null"]


def test_env_kwargs_bad_one_line(tmp_path, capsys):
    import proxrl

    for text in ENV_KWARGS_BAD:
        one_line(*cli(capsys, "train", "--progress", "off", *TINY, "--steps", "32", "--env-kwargs", text,
                      "--out", str(tmp_path / "k"))[::2], "env_kwargs")
        assert not (tmp_path / "k" / "config.json").exists()
    with pytest.raises(proxrl.ConfigError, match="^env_kwargs: "):
        proxrl.train(env="x", env_factory=_cartpole, env_kwargs={"a": 1}, steps=64, num_envs=2, num_steps=32,
                     out=str(tmp_path / "f"), progress="off")
    with pytest.raises(proxrl.ConfigError, match="^env_kwargs: "):
        proxrl.train(env="CartPole-v1", env_kwargs={"f": object()}, progress="off")


class _FarBounds:
    """A one-step bandit whose actions lie in [5, 10]; reward −(a − 8.5)², best action 8.5."""

    def __new__(cls):
        import gymnasium as gym

        class Bandit(gym.Env):
            observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
            action_space = gym.spaces.Box(5.0, 10.0, (1,), np.float32)

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                return np.zeros(1, np.float32), {}

            def step(self, a):
                return np.zeros(1, np.float32), -float((np.asarray(a).reshape(-1)[0] - 8.5) ** 2), True, False, {}

        return Bandit()


def _far_bounds_run(tmp_path, rescale: bool):
    import proxrl

    res = proxrl.train(env="far-bounds", env_factory=_FarBounds, algo="ppo-clip", steps=4096, num_envs=8,
                       num_steps=64, lr=3e-3, preset="none", action_rescale=rescale,
                       out=str(tmp_path / f"r{int(rescale)}"), progress="off")
    return proxrl.load(res.run_dir).act(np.zeros((1, 1), np.float32), deterministic=True)[0, 0]


def test_box_actions_far_from_zero_learn_when_rescaled(tmp_path):
    """Bounds [5, 10]: the policy's [-1, 1] maps onto them, so PPO finds the best action 8.5. Without the
    mapping every early sample is clipped to 5, the reward is constant and nothing is learnt."""
    assert abs(_far_bounds_run(tmp_path, True) - 8.5) < 0.4
    assert _far_bounds_run(tmp_path, False) == pytest.approx(5.0)


def test_action_map_is_affine_and_clipped():
    from proxrl.gym.envs import ActionMap

    m = ActionMap(np.array([5.0, -np.inf]), np.array([10.0, np.inf]), rescale=True)
    out = m(np.array([[-1.0, -7.0], [0.0, 3.0], [1.0, 0.0], [4.0, 1e6]]))
    assert out.tolist() == [[5.0, -7.0], [7.5, 3.0], [10.0, 0.0], [10.0, 1e6]]
    assert ActionMap(np.array([5.0]), np.array([10.0]), rescale=False)(np.array([[7.0], [-3.0]])).tolist() == [[7.0], [5.0]]


def test_runs_saved_before_rescaling_keep_acting_in_env_units(pendulum_run, tmp_path):
    import shutil

    import proxrl
    from proxrl.run import checkpoint

    old = tmp_path / "old"
    shutil.copytree(pendulum_run, old)
    path = checkpoint.latest(old / "checkpoints") / "state.json"
    state = json.loads(path.read_text())
    del state["config"]["action_rescale"]
    path.write_text(json.dumps(state))
    assert proxrl.load(old).config.action_rescale is False
    assert proxrl.load(pendulum_run).config.action_rescale is True


def test_a_preset_of_another_env_or_rung_is_named_on_stderr(tmp_path, capsys):
    rc, out, err = cli(capsys, "train", "--quiet", "--env", "Pendulum-v1", "--preset", "CartPole-v1/ppo-clip",
                       "--steps", "512", "--out", str(tmp_path / "r"))
    assert rc == 0 and json.loads(out)["run_dir"]
    assert "warning: preset: CartPole-v1/ppo-clip was tuned for CartPole-v1 with ppo-clip; applying it to Pendulum-v1" in err
    rc, out, err = cli(capsys, "train", "--quiet", "--env", "CartPole-v1", "--preset", "CartPole-v1/ppo-clip",
                       "--steps", "512", "--out", str(tmp_path / "s"))
    assert rc == 0 and "warning" not in err
