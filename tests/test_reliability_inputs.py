"""Issue 5, guarantee 6: a catalogue of bad inputs, each exit status 2 and one line naming the field.

The CLI cases run through ``proxrl.cli.main`` — the function ``python -m proxrl`` calls — in one child
process (several hundred interpreter start-ups would not fit the CI budget on 2 cores); every case fails
before any training starts. A few run as real ``python -m proxrl`` subprocesses as well. Custom environments
with defects go through the Python API; a hypothesis fuzz of the config checks that ``resolve`` raises
ConfigError or succeeds, never anything else. Under ``python -O`` the child runs with ``-O`` too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HERE = Path(__file__).resolve().parent


def _python() -> list[str]:
    return [sys.executable] + (["-O"] if sys.flags.optimize else [])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


# (id, argv, text the one stderr line must contain — the field)
T = ["train", "--progress", "off"]
SMALL = ["--num-envs", "2", "--num-steps", "16", "--steps", "32"]
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("steps negative", T + ["--steps", "-5"], "steps"),
    ("steps zero", T + ["--steps", "0"], "steps"),
    ("steps not a number", T + ["--steps", "abc"], "steps"),
    ("steps a float", T + ["--steps", "1.5"], "steps"),
    ("steps below one batch", T + ["--steps", "10"], "steps"),
    ("num_envs zero", T + ["--num-envs", "0"], "num_envs"),
    ("num_envs negative", T + ["--num-envs", "-2"], "num_envs"),
    ("num_envs a float", T + ["--num-envs", "1.5"], "num_envs"),
    ("num_envs huge", T + ["--num-envs", "100000000"], "num_envs"),
    ("num_steps zero", T + ["--num-steps", "0"], "num_steps"),
    ("update_epochs zero", T + ["--update-epochs", "0"], "update_epochs"),
    ("num_minibatches zero", T + ["--num-minibatches", "0"], "num_minibatches"),
    ("num_minibatches > batch", T + ["--num-minibatches", "100000"], "num_minibatches"),
    ("batch not divisible into minibatches",
     T + ["--preset", "none", "--num-envs", "3", "--num-steps", "7", "--num-minibatches", "2"], "num_minibatches"),
    ("critic batch not divisible",
     T + ["--algo", "trpo", "--preset", "none", "--num-envs", "3", "--num-steps", "7", "--critic-minibatches", "2"],
     "critic_minibatches"),
    ("critic_epochs zero", T + ["--algo", "trpo", "--critic-epochs", "0"], "critic_epochs"),
    ("gamma > 1", T + ["--gamma", "1.5"], "gamma"),
    ("gamma < 0", T + ["--gamma", "-0.1"], "gamma"),
    ("gamma not a number", T + ["--gamma", "abc"], "gamma"),
    ("gamma nan", T + ["--gamma", "nan"], "gamma"),
    ("gamma value missing", T + ["--gamma"], "gamma"),
    ("gae_lambda > 1", T + ["--gae-lambda", "2"], "gae_lambda"),
    ("lr zero", T + ["--lr", "0"], "lr"),
    ("lr negative", T + ["--lr", "-1e-3"], "lr"),
    ("lr inf", T + ["--lr", "inf"], "lr"),
    ("critic_lr zero", T + ["--critic-lr", "0"], "critic_lr"),
    ("critic_lr not a number", T + ["--critic-lr", "abc"], "critic_lr"),
    ("clip_coef zero", T + ["--clip-coef", "0"], "clip_coef"),
    ("clip_coef negative", T + ["--clip-coef", "-0.2"], "clip_coef"),
    ("ent_coef negative", T + ["--ent-coef", "-1"], "ent_coef"),
    ("vf_coef negative", T + ["--vf-coef", "-1"], "vf_coef"),
    ("max_grad_norm negative", T + ["--max-grad-norm", "-1"], "max_grad_norm"),
    ("target_kl zero", T + ["--target-kl", "0"], "target_kl"),
    ("kl_target zero", T + ["--algo", "ppo-kl", "--kl-target", "0"], "kl_target"),
    ("beta_init negative", T + ["--algo", "ppo-kl", "--beta-init", "-1"], "beta_init"),
    ("max_kl zero", T + ["--algo", "trpo", "--max-kl", "0"], "max_kl"),
    ("cg_iters zero", T + ["--algo", "trpo", "--cg-iters", "0"], "cg_iters"),
    ("cg_damping negative", T + ["--algo", "trpo", "--cg-damping", "-1"], "cg_damping"),
    ("backtrack_coef ≥ 1", T + ["--algo", "trpo", "--backtrack-coef", "1.5"], "backtrack_coef"),
    ("backtrack_iters negative", T + ["--algo", "trpo", "--backtrack-iters", "-1"], "backtrack_iters"),
    ("hidden zero", T + ["--hidden", "0"], "hidden"),
    ("hidden negative", T + ["--hidden", "64", "-64"], "hidden"),
    ("hidden empty", T + ["--hidden"], "hidden"),
    ("hidden not numbers", T + ["--hidden", "a", "b"], "hidden"),
    ("clip_obs zero", T + ["--clip-obs", "0"], "clip_obs"),
    ("clip_reward negative", T + ["--clip-reward", "-1"], "clip_reward"),
    ("seed negative", T + ["--seed", "-1"], "seed"),
    ("seed ≥ 2**32", T + ["--seed", str(2 ** 32)], "seed"),
    ("seed in float notation", T + ["--seed", "1e3"], "seed"),
    ("torch_threads zero", T + ["--torch-threads", "0"], "torch_threads"),
    ("checkpoint_every negative", T + ["--checkpoint-every", "-1"], "checkpoint_every"),
    ("keep_checkpoints zero", T + ["--keep-checkpoints", "0"], "keep_checkpoints"),
    ("unknown rung", T + ["--algo", "ppo3"], "algo"),
    ("unknown env id", T + ["--env", "NoSuchEnv-v9"], "env"),
    ("misspelt env id", T + ["--env", "Cartpole-v1"], "env"),
    ("empty env id", T + ["--env", ""], "env"),
    ("env value missing", T + ["--env"], "env"),
    ("env without numpy vectorisation", T + ["--env", "MountainCar-v0", "--vectorization", "numpy"] + SMALL,
     "vectorization"),
    ("unknown preset", T + ["--preset", "Nope"], "preset"),
    ("norm_adv invalid choice", T + ["--norm-adv", "foo"], "norm_adv"),
    ("activation invalid choice", T + ["--activation", "sigmoid"], "activation"),
    ("progress invalid choice", T + ["--progress", "maybe"], "progress"),
    ("vectorization invalid choice", T + ["--vectorization", "gpu"], "vectorization"),
    ("device not a device", T + ["--device", "banana"], "device"),
    ("unknown option", T + ["--nope"], "nope"),
    ("unexpected positional argument", T + ["positional"], "arguments"),
    ("resume from a directory without checkpoints", T + ["--resume", "/nonexistent/run"], "checkpoint"),
    ("eval: no such run", ["eval", "/nonexistent/run"], "is not a directory"),
    ("networks too big for memory", T + ["--hidden", "1000000", "1000000", "--out", "/nonexistent/oom"], "memory"),
    ("eval: run_dir missing", ["eval"], "run_dir"),
    ("eval: episodes zero", ["eval", "/nonexistent/run", "--episodes", "0"], "episodes"),
    ("eval: episodes not a number", ["eval", "/nonexistent/run", "--episodes", "abc"], "episodes"),
    ("eval: unknown option", ["eval", "/nonexistent/run", "--nope"], "nope"),
    ("eval: checkpoint config with a wrong type", ["eval", "{badcfg}"], "gamma"),
    ("eval: checkpoint state.json truncated", ["eval", "{truncated}"], "state.json"),
    ("plot: no such run", ["plot", "/nonexistent/run"], "metrics.jsonl"),
    ("plot: malformed metrics.jsonl", ["plot", "{badmetrics}", "--out", "{tmp}/c.png"], "metrics.jsonl"),
    ("plot: runs missing", ["plot"], "runs"),
    ("ladder: seeds zero", ["ladder", "--seeds", "0"], "seeds"),
    ("ladder: seeds not a number", ["ladder", "--seeds", "x"], "seeds"),
    ("ladder: unknown rung", ["ladder", "--algos", "foo"], "algos"),
    ("ladder: steps negative", ["ladder", "--steps", "-1"], "steps"),
    ("ladder: unknown env", ["ladder", "--env", "Nope-v0"], "env"),
    ("unknown command", ["frobnicate"], "command"),
]

# data files of the RLHF stages: each fails while reading the data, before a model is loaded
RLHF_CASES: list[tuple[str, list[str], str]] = [
    ("sft: data file missing", ["rlhf", "sft", "--model", "m", "--data", "{tmp}/none.jsonl"], "none.jsonl"),
    ("sft: malformed JSONL line", ["rlhf", "sft", "--model", "m", "--data", "{malformed}"], ":2"),
    ("sft: missing 'response' field", ["rlhf", "sft", "--model", "m", "--data", "{noresponse}"], "response"),
    ("sft: prompt of the wrong type", ["rlhf", "sft", "--model", "m", "--data", "{wrongtype}"], "prompt"),
    ("sft: a line that is a list", ["rlhf", "sft", "--model", "m", "--data", "{listline}"], "object"),
    ("sft: empty data file", ["rlhf", "sft", "--model", "m", "--data", "{empty}"], "no records"),
    ("sft: lr zero", ["rlhf", "sft", "--model", "m", "--data", "d", "--lr", "0"], "lr"),
    ("sft: model missing", ["rlhf", "sft", "--data", "d"], "model"),
    ("rm: missing 'chosen' field", ["rlhf", "rm", "--model", "m", "--data", "{noresponse}"], "chosen"),
    ("rm: eval_fraction 1", ["rlhf", "rm", "--model", "m", "--data", "d", "--eval-fraction", "1"], "eval_fraction"),
    ("ppo: prompts file missing", ["rlhf", "ppo", "--policy", "p", "--reward", "m:f", "--prompts", "{tmp}/no.jsonl"],
     "no.jsonl"),
    ("ppo: missing 'prompt' field", ["rlhf", "ppo", "--policy", "p", "--reward", "m:f", "--prompts", "{noprompt}"],
     "prompt"),
    ("ppo: batch not divisible into minibatches",
     ["rlhf", "ppo", "--policy", "p", "--reward", "m:f", "--prompts", "x", "--batch-size", "8",
      "--num-minibatches", "3"], "num_minibatches"),
    ("ppo: gamma > 1", ["rlhf", "ppo", "--policy", "p", "--reward", "m:f", "--prompts", "x", "--gamma", "2"], "gamma"),
    ("ppo: temperature zero", ["rlhf", "ppo", "--policy", "p", "--reward", "m:f", "--prompts", "x",
                               "--temperature", "0"], "temperature"),
    ("rlhf: unknown command", ["rlhf", "dpo"], "dpo"),
]

ALL_CASES = CLI_CASES + RLHF_CASES

DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    from proxrl.cli import main
    cases = json.load(open(sys.argv[1]))
    results = []
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        tb = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                rc, tb = None, traceback.format_exc()
        results.append({"rc": rc, "stderr": err.getvalue() + (tb or ""), "stdout": out.getvalue()})
    json.dump(results, open(sys.argv[2], "w"))
""")


def _fixtures(tmp: Path) -> dict[str, str]:
    """Bad files the cases refer to by {name}."""
    f = {"tmp": str(tmp)}
    runs = {"badcfg": {"gamma": "0.99"}, "truncated": None}
    for name, cfg in runs.items():
        ck = tmp / name / "checkpoints" / "ckpt-000000000001"
        ck.mkdir(parents=True)
        from safetensors.torch import save
        import torch

        (ck / "tensors.safetensors").write_bytes(save({"policy/x": torch.zeros(1)}))
        state = {"format": "proxrl.gym/1", "update": 1, "step": 1, "config": cfg or {},
                 "policy": {"kind": "discrete", "obs_dim": 4, "act_dim": 2, "nvec": [], "critic": True}}
        raw = json.dumps(state)
        (ck / "state.json").write_text(raw if cfg is not None else raw[: len(raw) // 2])
        f[name] = str(tmp / name)
    (tmp / "badmetrics").mkdir()
    (tmp / "badmetrics" / "metrics.jsonl").write_text('{"step": 1, "episode_return": 2}\n{"step": 2, oops\n')
    f["badmetrics"] = str(tmp / "badmetrics")
    data = {
        "malformed": '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n',
        "noresponse": '{"prompt": "a"}\n',
        "wrongtype": '{"prompt": 5, "response": "b", "chosen": "c", "rejected": "d"}\n',
        "listline": '["prompt", "response"]\n',
        "empty": "\n\n",
        "noprompt": '{"text": "a"}\n',
    }
    for name, text in data.items():
        (tmp / f"{name}.jsonl").write_text(text)
        f[name] = str(tmp / f"{name}.jsonl")
    return f


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    fx = _fixtures(tmp)
    lm = (Path(SRC) / "proxrl" / "lm" / "cli.py").is_file()
    cases = [[a.format(**fx) for a in argv] for _, argv, _ in (ALL_CASES if lm else CLI_CASES)]
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "driver.py").write_text(DRIVER)
    p = subprocess.run(_python() + [str(tmp / "driver.py"), str(tmp / "cases.json"), str(tmp / "out.json")],
                       capture_output=True, text=True, env=_env(), timeout=900, cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp / "out.json").read_text())
    return {name: r for (name, _, _), r in zip(ALL_CASES, res)}


def _assert_one_line(rc, stderr: str, field: str, name: str = "") -> None:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert "Traceback" not in stderr, (name, stderr)
    assert rc == 2, (name, rc, stderr)
    assert len(lines) == 1, (name, stderr)
    assert lines[0].startswith("error: ") and field in lines[0], (name, field, lines[0])


@pytest.mark.parametrize("name,argv,field", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_input_exit_2_one_line(name, argv, field, results):
    if name not in results:
        pytest.skip("proxrl.lm.cli not present")
    r = results[name]
    _assert_one_line(r["rc"], r["stderr"], field, name)


@pytest.mark.parametrize("argv,field", [
    (["train", "--gamma", "abc"], "gamma"),
    (["train", "--num-envs", "1.5"], "num_envs"),
    (["train", "--nope"], "nope"),
])
def test_tyro_errors_one_line_real_subprocess(argv, field):
    p = subprocess.run(_python() + ["-m", "proxrl", *argv], capture_output=True, text=True, env=_env(), timeout=300)
    _assert_one_line(p.returncode, p.stderr, field)


def test_help_is_intact():
    p = subprocess.run(_python() + ["-m", "proxrl", "train", "--help"], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert p.returncode == 0 and "--gae-lambda" in p.stdout and "--clip-coef" in p.stdout and not p.stderr.strip()


# ----------------------------------------------------------------------------- defective environments
class BadEnv:
    """A CartPole-shaped env (Box(4), Discrete(2)) with one configurable defect."""

    def __new__(cls, defect: str):
        import gymnasium as gym
        import numpy as np

        class _Env(gym.Env):
            def __init__(self):
                self.observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
                self.action_space = gym.spaces.Discrete(2)
                self.t = 0

            def _obs(self):
                if defect == "obs shape" or (defect == "obs shape later" and self.t >= 3):
                    return np.zeros(5, np.float32)
                if defect == "obs nan" or (defect == "obs nan later" and self.t >= 3):
                    return np.full(4, np.nan, np.float32)
                if defect == "obs inf":
                    return np.full(4, np.inf, np.float32)
                if defect == "obs none":
                    return None
                return np.zeros(4, np.float32)

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.t = 0
                return self._obs(), {}

            def step(self, action):
                self.t += 1
                r = {"reward nan": math.nan, "reward inf": math.inf, "reward str": "one"}.get(defect, 1.0)
                if defect == "reward nan later" and self.t >= 3:
                    r = math.nan
                if defect == "old step api":
                    return self._obs(), r, self.t >= 10, {}
                return self._obs(), r, self.t >= 10, False, {}

        return _Env()


ENV_CASES = [
    ("obs shape", "observation"), ("obs nan", "observation"), ("obs inf", "observation"),
    ("obs none", "observation"), ("obs nan later", "observation"), ("reward nan", "reward"),
    ("reward inf", "reward"), ("reward str", "reward"), ("reward nan later", "reward"), ("old step api", "step"),
    ("not an env", "env_factory"),
]


@pytest.mark.parametrize("defect,quantity", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_defective_env_one_line_error(defect, quantity, tmp_path):
    import proxrl

    factory = (lambda: object()) if defect == "not an env" else (lambda: BadEnv(defect))
    with pytest.raises(proxrl.ProxrlError) as e:
        proxrl.train(env="Bad-v0", env_factory=factory, steps=64, num_envs=2, num_steps=32, num_minibatches=1,
                     out=str(tmp_path / "run"), progress="off", preset="none")
    msg = str(e.value)
    assert quantity in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- config fuzz (hypothesis)
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from proxrl.gym.config import FIELD_NAMES, resolve  # noqa: E402
from proxrl.errors import ConfigError  # noqa: E402

_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["CartPole-v1", "ppo-clip", "trpo", "none", "auto", "whiten", "cpu", "tanh", "64"]),
    st.lists(st.one_of(st.integers(-5, 300), st.text(max_size=3), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FUZZ_EXAMPLES = 300


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(FIELD_NAMES)), _values, max_size=6))
def test_config_fuzz_only_config_errors(fields):
    try:
        cfg, _ = resolve(fields)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and e.field in msg
        return
    # accepted: then it must be a config that validates (types right, ranges right)
    assert cfg.batch_size > 0 and cfg.num_updates >= 1


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.dictionaries(st.text(max_size=8), _values, max_size=3))
def test_config_fuzz_unknown_fields(fields):
    try:
        resolve(fields)
    except ConfigError:
        pass
