"""The gym path: rollouts, truncation, update rules, presets, checkpoints, determinism."""

from __future__ import annotations

import json

import gymnasium as gym
import dataclasses

import numpy as np
import pytest
import torch

import proxrl
from proxrl import core
from proxrl.batch import Batch
from proxrl.gym.config import TrainConfig, resolve
from proxrl.gym.envs import make_vec_env
from proxrl.errors import ConfigError, NumericsError
from proxrl.objective import estimate_advantages
from proxrl.gym.policy import ActorCritic
from proxrl.gym.rollout import Runner
from proxrl.rungs import RUNGS
from proxrl.gym.update import make_optimizer, post_update_diagnostics, sgd_update, trust_region_update

torch.set_num_threads(1)


class Corridor(gym.Env):
    """Walk right on a line. Reaching x = goal terminates (reward 1); a time limit truncates.

    Observation = (x, t). Action 0 stays, 1 moves right. With goal beyond the time limit, every episode
    is truncated; with a near goal and always-right, every episode terminates.
    """

    def __init__(self, goal: int = 3, limit: int = 5):
        self.goal, self.limit = goal, limit
        self.observation_space = gym.spaces.Box(-100, 100, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = 0, 0
        return np.array([self.x, self.t], np.float32), {}

    def step(self, action):
        self.x += int(action)
        self.t += 1
        terminated = self.x >= self.goal
        truncated = (not terminated) and self.t >= self.limit
        return np.array([self.x, self.t], np.float32), 1.0, terminated, truncated, {}


def _runner(goal, limit, num_envs=2, critic=True):
    envs = make_vec_env(lambda: Corridor(goal, limit), num_envs)
    policy = ActorCritic.for_spaces(envs.single_observation_space, envs.single_action_space, critic=critic)
    return Runner(envs, policy, seed=0, gamma=0.9, obs_norm=False, reward_norm=False), policy


def test_truncation_bootstraps_and_termination_does_not():
    gamma, lam = 0.9, 0.95
    # goal unreachable within the limit: every episode is truncated after 4 steps
    runner, policy = _runner(goal=100, limit=4)
    batch, stats = runner.collect(12)
    assert batch.truncated.sum() > 0 and batch.terminated.sum() == 0
    b = estimate_advantages(batch, "gae", gamma, lam)
    for e in range(batch.shape[0]):
        for t in torch.nonzero(batch.truncated[e])[:, 0].tolist():
            # the observation after a truncated step is the final observation; its value is the bootstrap
            final_obs = batch.obs[e, t + 1] if t + 1 < batch.shape[1] else None
            if final_obs is None:
                continue
            with torch.no_grad():
                v_final = policy.value(final_obs[None].clone())[0]
            assert batch.mask[e, t + 1] == 0  # the autoreset step is never trained on
            # float32: the rollout's batched forward and this one-row forward may round apart by ~1e-7
            assert torch.allclose(batch.next_values[e, t], v_final, atol=1e-6)
            expected = batch.rewards[e, t] + gamma * v_final - batch.values[e, t]
            assert torch.allclose(b.adv[e, t], expected, atol=1e-6)
    # goal reached before the limit: always-right policy terminates; no bootstrap
    runner, policy = _runner(goal=2, limit=50)
    with torch.no_grad():  # force "always right"
        policy.actor[-1].bias.copy_(torch.tensor([-50.0, 50.0]))
    batch, stats = runner.collect(9)
    assert batch.terminated.sum() > 0 and batch.truncated.sum() == 0
    b = estimate_advantages(batch, "gae", gamma, lam)
    idx = batch.terminated.bool()
    assert torch.allclose(b.adv[idx], (batch.rewards - batch.values)[idx], atol=1e-6)
    assert stats.returns and all(r == 2.0 for r in stats.returns)


def test_autoreset_step_is_masked_and_returns_are_right():
    runner, _ = _runner(goal=100, limit=3, num_envs=1, critic=False)
    batch, stats = runner.collect(8)
    # steps: 3 real, 1 autoreset, 3 real, 1 autoreset
    assert batch.mask[0].tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert batch.truncated[0].tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert stats.returns == [3.0, 3.0] and stats.lengths == [3, 3]
    ret = core.total_return(batch.rewards, batch.terminated, batch.truncated, batch.mask)
    assert ret[0, :3].tolist() == [3.0, 3.0, 3.0]


def test_observations_carry_over_between_rollouts():
    runner, _ = _runner(goal=100, limit=5, num_envs=1, critic=False)
    b1, _ = runner.collect(2)
    b2, _ = runner.collect(2)
    assert b2.obs[0, 0, 1].item() == 2.0  # t continues: no reset at the iteration boundary


def _flat_batch(cfg: TrainConfig, env="CartPole-v1"):
    torch.manual_seed(0)
    envs = make_vec_env(env, cfg.num_envs)
    rung = RUNGS[cfg.algo]
    policy = ActorCritic.for_spaces(envs.single_observation_space, envs.single_action_space, critic=rung.critic)
    runner = Runner(envs, policy, 0, cfg.gamma, cfg.obs_norm, cfg.reward_norm)
    batch, _ = runner.collect(cfg.num_steps)
    batch = estimate_advantages(batch, rung.weight, cfg.gamma, cfg.gae_lambda)
    return policy, batch.flatten_valid(), rung


@pytest.mark.parametrize("algo", ["pg", "pg-baseline", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip"])
def test_ratio_is_exactly_one_on_first_minibatch(algo):
    cfg, _ = resolve({"algo": algo, "num_envs": 4, "num_steps": 32, "preset": "none", "steps": 128})
    policy, flat, rung = _flat_batch(cfg)
    stats = sgd_update(policy, make_optimizer(policy, 1e-3), flat, rung, cfg, cfg.beta_init, 1,
                       policy.snapshot(flat.obs[:, 0]))
    assert stats["ratio_first_dev"] == 0.0


@pytest.mark.parametrize("algo,env", [("trpo", "CartPole-v1"), ("trpo", "Pendulum-v1"), ("npg", "CartPole-v1")])
def test_trust_region_step_respects_kl(algo, env):
    cfg, _ = resolve({"algo": algo, "env": env, "num_envs": 2, "num_steps": 256, "preset": "none", "steps": 512,
                      "max_kl": 0.01})
    policy, flat, rung = _flat_batch(cfg, env)
    old = policy.snapshot(flat.obs[:, 0])
    theta0 = torch.nn.utils.parameters_to_vector(policy.actor_parameters()).clone()
    stats = trust_region_update(policy, make_optimizer(policy, 1e-3), flat, rung, cfg, 1, old)
    diag = post_update_diagnostics(policy, flat, old)
    moved = not torch.equal(theta0, torch.nn.utils.parameters_to_vector(policy.actor_parameters()))
    assert stats["ls_accepted"] and moved
    if rung.line_search:
        assert diag["kl_old_exact"] <= cfg.max_kl
    else:  # the full natural step targets ½sᵀFs = δ: KL close to δ to second order
        assert 0.1 * cfg.max_kl < diag["kl_old_exact"] < 3 * cfg.max_kl


def test_per_dim_trust_region_is_the_joint_one_scaled_by_the_action_dims():
    """trust_region_kl='per-dim' with (δ, λ) takes the step of 'joint' with (n·δ, n·λ), n = action dims: the
    per-dim KL is joint/n, so its Hessian is F/n, CG solves (F/n + λ)s = g, and the step scales to match
    (how sb3-contrib's target_kl and cg_damping translate to the joint KL)."""
    steps = {}
    torch.manual_seed(0)  # a 3-dim Gaussian policy on a synthetic batch (with 1 dim both modes are the same)
    obs = torch.randn(256, 4)
    act = torch.randn(256, 3)
    adv = torch.randn(256)
    for mode, max_kl, damping in (("per-dim", 0.01, 0.1), ("joint", 0.03, 0.3)):
        cfg, _ = resolve({"algo": "trpo", "env": "Pendulum-v1", "preset": "none", "trust_region_kl": mode,
                          "max_kl": max_kl, "cg_damping": damping, "critic_epochs": 1, "critic_minibatches": 1,
                          "num_envs": 1, "num_steps": 256, "steps": 256, "cg_iters": 10})
        torch.manual_seed(1)
        policy = ActorCritic(4, "continuous", 3)
        with torch.no_grad():
            logp = policy.dist(obs).log_prob(act)
            values = policy.value(obs)
        col = lambda x: x[:, None]  # noqa: E731  [N] -> [N, 1]
        flat = Batch(obs=obs[:, None], actions=act[:, None], logp_old=col(logp), rewards=col(adv),
                     terminated=col(torch.zeros(256)), truncated=col(torch.zeros(256)), mask=col(torch.ones(256)),
                     values=col(values), next_values=col(values), adv=col(adv), ret=col(values + adv))
        theta0 = torch.nn.utils.parameters_to_vector(policy.actor_parameters()).clone()
        stats = trust_region_update(policy, torch.optim.Adam(policy.critic.parameters()), flat, RUNGS["trpo"], cfg,
                                    1, policy.snapshot(obs))
        assert stats["ls_accepted"]
        steps[mode] = torch.nn.utils.parameters_to_vector(policy.actor_parameters()).detach() - theta0
    assert torch.allclose(steps["per-dim"], steps["joint"], rtol=1e-4, atol=1e-6)


def test_rejected_line_search_restores_parameters(monkeypatch):
    cfg, _ = resolve({"algo": "trpo", "num_envs": 2, "num_steps": 64, "preset": "none", "steps": 128})
    policy, flat, rung = _flat_batch(cfg)
    tried = []

    def reject_all(evaluate, max_kl, coef, iters):  # tries steps (moving θ), accepts none
        for frac in (1.0, 0.5):
            tried.append(evaluate(frac))
        return core.LineSearchResult(False, 0.0, 2, -1.0, 1.0)

    monkeypatch.setattr(core, "backtracking_line_search", reject_all)
    theta0 = torch.nn.utils.parameters_to_vector(policy.actor_parameters()).clone()
    stats = trust_region_update(policy, torch.optim.Adam(policy.critic.parameters()), flat, rung, cfg, 1, policy.snapshot(flat.obs[:, 0]))
    assert not stats["ls_accepted"] and len(tried) == 2
    assert torch.equal(theta0, torch.nn.utils.parameters_to_vector(policy.actor_parameters()))


def test_preset_resolution_order():
    cfg, name = resolve({"env": "CartPole-v1", "algo": "ppo-clip"})
    assert name == "CartPole-v1/ppo-clip" and cfg.num_steps == 64 and cfg.update_epochs == 8
    cfg, _ = resolve({"env": "CartPole-v1", "algo": "ppo-clip", "update_epochs": 3})
    assert cfg.update_epochs == 3 and cfg.num_steps == 64  # explicit beats preset, preset beats rung
    cfg, name = resolve({"env": "CartPole-v1", "algo": "ppo-clip", "preset": "none"})
    assert name is None and cfg.num_steps == 128 and cfg.preset == "none"
    cfg, name = resolve({"env": "MountainCar-v0", "algo": "pg"})
    assert name is None and cfg.update_epochs == 1  # rung defaults without a preset
    with pytest.raises(ConfigError, match="preset"):
        resolve({"preset": "Nope/ppo"})


@pytest.mark.parametrize("bad,field", [({"gamma": 1.5}, "gamma"), ({"steps": 0}, "steps"), ({"clip_coef": 0.0}, "clip_coef"),
                                       ({"num_minibatches": 10_000, "preset": "none"}, "num_minibatches"),
                                       ({"algo": "ppo3"}, "algo"), ({"lr": float("nan")}, "lr"), ({"bogus": 1}, "bogus")])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        resolve(bad)
    assert str(e.value).startswith(field)


def _short(algo, tmp_path, env="CartPole-v1", **kw):
    fields = dict(env=env, algo=algo, steps=1024, num_envs=4, num_steps=64, seed=3, out=str(tmp_path / algo),
                  progress="off", preset="none")
    fields.update(kw)
    return proxrl.train(**fields)


@pytest.mark.parametrize("algo", ["pg", "pg-baseline", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo", "npg"])
def test_every_rung_runs_and_logs_the_schema(algo, tmp_path):
    from proxrl.gym.trainer import METRICS

    res = _short(algo, tmp_path)
    lines = [json.loads(l) for l in open(res.run_dir / "metrics.jsonl")]
    assert len(lines) == 4
    for line in lines:
        assert set(METRICS) <= set(line)
        assert line["ratio_first_dev"] in (0.0, None)
    assert lines[-1]["step"] == 1024
    if algo == "ppo-kl":
        assert all(l["beta"] is not None for l in lines)
    if algo == "ppo-clip":
        assert all(l["clip_fraction"] is not None for l in lines)
    cfg = json.load(open(res.run_dir / "config.json"))
    assert cfg["algo"] == algo and cfg["preset"] == "none"


@pytest.mark.parametrize("env", ["Pendulum-v1", "MountainCarContinuous-v0"])
def test_continuous_actions(env, tmp_path):
    res = _short("ppo-clip", tmp_path, env=env, obs_norm=True, reward_norm=True)
    agent = proxrl.load(res.run_dir)
    assert agent.policy.kind == "continuous"
    out = proxrl.evaluate(res.run_dir, episodes=2)
    assert np.isfinite(out["mean_return"])


def test_multidiscrete_actions(tmp_path):
    class Multi(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
        action_space = gym.spaces.MultiDiscrete([3, 2])

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.np_random.uniform(-1, 1, 3).astype(np.float32), {}

        def step(self, a):
            self.t += 1
            r = float(a[0] == 2) + float(a[1] == 0)
            return self.np_random.uniform(-1, 1, 3).astype(np.float32), r, False, self.t >= 10, {}

    res = proxrl.train(env="multi", env_factory=Multi, algo="ppo-clip", steps=4096, num_envs=4, num_steps=128,
                       out=str(tmp_path / "m"), progress="off", lr=3e-3)
    rets = [m["episode_return"] for m in res.metrics if m["episode_return"] is not None]
    assert rets[-1] > rets[0] and rets[-1] > 15  # optimum is 20


class ShiftedActions(gym.Env):
    """Actions of a space with ``start`` ≠ 0 and a 2-D MultiDiscrete ``nvec``: every action the env receives
    is recorded (and checked against the space: no assert in the env, so a wrong action would pass silently)."""

    def __init__(self, space, log):
        self.observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.action_space, self.log = space, log

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, a):
        self.t += 1
        self.log.append(np.asarray(a).copy())
        return np.zeros(2, np.float32), 0.0, False, self.t >= 5, {}


@pytest.mark.parametrize("space", [gym.spaces.Discrete(3, start=-1),
                                   gym.spaces.MultiDiscrete([3, 4], start=[-1, 5]),
                                   gym.spaces.MultiDiscrete([[2, 3], [4, 2]])])
def test_discrete_actions_reach_the_env_in_its_start_and_shape(tmp_path, space):
    """The policy draws indices from 0; the env gets them shifted by the space's ``start`` and shaped like
    its ``nvec`` — in training, in ``proxrl.evaluate`` and from ``proxrl.load(run).act`` — and every value of
    the space is used (the policy samples over all of it)."""
    log: list = []
    res = proxrl.train(env="shifted", env_factory=lambda: ShiftedActions(space, log), algo="ppo-clip", steps=256,
                       num_envs=2, num_steps=32, out=str(tmp_path / "r"), progress="off")
    assert len(log) > 200 and all(space.contains(np.asarray(a, space.dtype)) for a in log), \
        [a for a in log if not space.contains(np.asarray(a, space.dtype))][:3]
    seen = np.stack([np.asarray(a).reshape(-1) for a in log])
    lo = np.asarray(space.start).reshape(-1) if space.shape else np.array([space.start])
    n = np.asarray(space.nvec).reshape(-1) if space.shape else np.array([space.n])
    assert (seen.min(0) == lo).all() and (seen.max(0) == lo + n - 1).all()  # the whole range, shifted
    log.clear()
    proxrl.evaluate(res.run_dir, episodes=2, env_factory=lambda: ShiftedActions(space, log))
    assert log and all(space.contains(np.asarray(a, space.dtype)) for a in log)
    a = proxrl.load(res.run_dir).act(np.zeros(2, np.float32))
    assert space.contains(np.asarray(a, space.dtype))



@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_a_box_of_integer_actions_is_one_line_not_real_actions(tmp_path, dtype):
    """A Box of integer dtype used to train: the env got the Gaussian's real numbers (2.73 in a
    ``Box(0, 10, (2,), int64)``), outside its space, without a word."""
    space = gym.spaces.Box(0, 10, (2,), dtype)
    log: list = []
    with pytest.raises(ConfigError, match=r"env: action space Box.* has (int64|uint8) actions.*MultiDiscrete"):
        proxrl.train(env="intbox", env_factory=lambda: ShiftedActions(space, log), algo="ppo-clip", steps=64,
                     num_envs=2, num_steps=32, out=str(tmp_path / "r"), progress="off")
    assert not (tmp_path / "r").exists()



@pytest.mark.parametrize("obs,act", [((0,), gym.spaces.Discrete(2)), ((2,), gym.spaces.Box(-1, 1, (0,), np.float32)),
                                     ((2, 0), gym.spaces.Discrete(2)), ((2,), gym.spaces.MultiDiscrete([]))])
def test_a_space_of_no_elements_is_one_line(tmp_path, obs, act):
    """An observation or action space of shape (0,) trained until the first update, then died in
    ``Batch.flatten_valid`` with a RuntimeError traceback (reshape of 0 elements)."""

    class Empty(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, obs, np.float32)
        action_space = act

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(obs, np.float32), {}

        def step(self, a):
            return np.zeros(obs, np.float32), 0.0, False, True, {}

    with pytest.raises(ConfigError, match=r"env: (observation|action) space .* has no elements"):
        proxrl.train(env="empty", env_factory=Empty, algo="ppo-clip", steps=64, num_envs=2, num_steps=32,
                     out=str(tmp_path / "r"), progress="off")
    assert not (tmp_path / "r").exists()


def test_evaluate_of_an_env_that_never_ends_is_one_line(tmp_path):
    class Endless(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, a):
            return np.zeros(2, np.float32), 1.0, False, False, {}

    res = proxrl.train(env="endless", env_factory=Endless, algo="pg", steps=64, num_envs=1, num_steps=64,
                       out=str(tmp_path / "r"), progress="off")
    with pytest.raises(ConfigError, match="env: 2 of 2 evaluation episodes did not end within 50 steps.*TimeLimit"):
        proxrl.evaluate(res.run_dir, episodes=2, env_factory=Endless, max_steps=50)


def test_an_exception_in_the_envs_step_is_one_line(tmp_path):
    class Broken(Corridor):
        def step(self, action):
            if self.t >= 3:
                raise RuntimeError("sensor offline\nsecond line")
            return super().step(action)

    with pytest.raises(ConfigError, match=r"env: the environment's step raised RuntimeError: sensor offline at step \d+"):
        proxrl.train(env="broken", env_factory=lambda: Broken(10, 50), algo="pg", steps=64, num_envs=1, num_steps=16,
                     out=str(tmp_path / "r"), progress="off")


def test_loading_a_run_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^run_dir: .*nope is not a directory"):
        proxrl.load(tmp_path / "nope")


def test_a_hand_built_train_config_is_checked_and_gets_its_preset(tmp_path):
    """proxrl.train(TrainConfig(...)) used to run any value unchecked (γ = 1.5 trained on, a bad lr was a torch
    traceback) and without the env's preset; now as the keyword form: checked, and the preset applied."""
    from proxrl.gym.config import TrainConfig

    for bad, field in ((dict(gamma=1.5), "gamma"), (dict(lr=-1.0), "lr"), (dict(num_minibatches=3), "num_minibatches"),
                       (dict(algo="nosuch"), "algo")):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            proxrl.train(TrainConfig(env="CartPole-v1", steps=1024, out=str(tmp_path / field), **bad))
        assert not (tmp_path / field).exists()
    res = proxrl.train(TrainConfig(env="Pendulum-v1", algo="ppo-clip", steps=2048, num_envs=2, num_steps=64,
                                   out=str(tmp_path / "p"), progress="off"))
    kw = proxrl.train(env="Pendulum-v1", algo="ppo-clip", steps=2048, num_envs=2, num_steps=64,
                      out=str(tmp_path / "k"), progress="off")
    assert res.config == dataclasses.replace(kw.config, out=str(tmp_path / "p")) and res.config.preset != "none"


def test_act_refuses_an_observation_of_the_wrong_size(tmp_path):
    res = proxrl.train(env="Pendulum-v1", algo="pg", steps=256, num_envs=2, num_steps=64, obs_norm=True,
                       out=str(tmp_path / "r"), progress="off")
    agent = proxrl.load(res.run_dir)
    assert agent.act(np.zeros(3)).shape == (1,) and agent.act(np.zeros((5, 3))).shape == (5, 1)
    for bad in (np.zeros(4), np.zeros((2, 4)), np.zeros((0, 3)), np.float32(1.0), "obs"):
        with pytest.raises(ConfigError, match="^obs: "):
            agent.act(bad)


def test_a_failed_start_with_overwrite_keeps_the_old_run(tmp_path, monkeypatch):
    """--overwrite removes the old run only once the new one has started: a start that fails (TensorBoard
    missing, a device that holds no data, a network that cannot be built) leaves it as it was."""
    import builtins

    out = tmp_path / "r"
    proxrl.train(env="CartPole-v1", algo="pg", steps=128, num_envs=2, num_steps=64, out=str(out), progress="off")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name == "torch.utils.tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    fresh = dict(env="CartPole-v1", algo="pg", steps=128, num_envs=2, num_steps=64, out=str(out), progress="off",
                 overwrite=True)
    for bad, field in ((dict(tensorboard=True), "tensorboard"), (dict(device="meta"), "device")):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            proxrl.train(**fresh, **bad)
    monkeypatch.undo()
    import proxrl.gym.trainer as gt

    monkeypatch.setattr(gt, "build_policy", lambda *a, **kw: (_ for _ in ()).throw(MemoryError("too big")))
    with pytest.raises(MemoryError):
        proxrl.train(**fresh)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_options_a_rung_does_not_use_are_said_once(tmp_path, capsys):
    """An entropy bonus, a clipped value loss or a KL early stop on trpo were accepted and changed nothing."""
    common = dict(env="CartPole-v1", steps=512, num_envs=2, num_steps=128, progress="off")
    proxrl.train(algo="trpo", ent_coef=0.05, clip_vloss=True, target_kl=0.01, out=str(tmp_path / "t"), **common)
    err = capsys.readouterr().err
    for name in ("ent_coef", "clip_vloss", "target_kl"):
        assert err.count(f"warning: {name}: has no effect on trpo") == 1, err
    proxrl.train(algo="ppo-clip", ent_coef=0.05, clip_vloss=True, target_kl=0.01, out=str(tmp_path / "p"), **common)
    assert "has no effect" not in capsys.readouterr().err


def test_policy_loss_is_the_surrogate_and_early_stop_means_epochs_were_left(tmp_path):
    """policy_loss is the surrogate alone (it used to include vf_coef·value_loss and the entropy term): with no
    gradient clip coupling actor and critic, update 1's actor steps do not depend on vf_coef, nor does its
    policy_loss. early_stop is true only when epochs were left (it was also set after the last epoch)."""
    common = dict(env="CartPole-v1", algo="ppo-clip", steps=256, num_envs=2, num_steps=128, max_grad_norm=1e9,
                  progress="off")
    a = proxrl.train(vf_coef=0.5, out=str(tmp_path / "a"), **common).metrics[0]
    b = proxrl.train(vf_coef=2.0, out=str(tmp_path / "b"), **common).metrics[0]
    assert a["policy_loss"] == b["policy_loss"] and a["value_loss"] != b["value_loss"]
    runs = [proxrl.train(target_kl=1e-9, update_epochs=e, out=str(tmp_path / f"e{e}"), **common).metrics[0]
            for e in (1, 4)]
    assert (runs[0]["epochs_done"], runs[0]["early_stop"]) == (1, False)  # one epoch: nothing left to stop
    assert (runs[1]["epochs_done"], runs[1]["early_stop"]) == (1, True)


def test_minibatches_are_never_empty():
    """A gym batch loses its autoreset steps, so it may hold fewer rows than minibatches: each row is then a
    minibatch of its own (no empty minibatch, whose mean loss is NaN); no rows, no minibatch."""
    from proxrl.run.sgd import minibatches

    for n, k in ((10, 4), (3, 8), (1, 1), (5, 5)):
        parts = minibatches(n, k, torch.Generator().manual_seed(0))
        assert len(parts) == min(n, k) and all(len(p) > 0 for p in parts)
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
    assert minibatches(0, 4) == []
    # the same draws as before when the batch is large enough (runs unchanged)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(minibatches(64, 4, g1), torch.randperm(64, generator=g2).tensor_split(4)))


@pytest.mark.parametrize("algo,extra", [("ppo-clip", dict(num_minibatches=16)), ("pg-rtg", dict(critic_minibatches=16))])
def test_minibatches_close_to_the_batch_size_train(tmp_path, algo, extra):
    """16 minibatches of a 16-step batch: after an episode ends its autoreset step is dropped, fewer than 16
    rows remain, and the update still runs (it used to take an empty minibatch and stop on a NaN loss)."""
    res = proxrl.train(env="corridor", env_factory=lambda: Corridor(3, 5), algo=algo, steps=256, num_envs=2,
                       num_steps=8, out=str(tmp_path / "r"), progress="off", **extra)
    assert len(res.metrics) == 16 and all(m["policy_loss"] is not None and np.isfinite(m["policy_loss"])
                                          for m in res.metrics)


def test_a_rollout_of_autoreset_steps_only_is_one_line(tmp_path):
    """One env, one step per rollout: after every episode's end the whole rollout is its autoreset step."""
    with pytest.raises(NumericsError, match="no valid step in the rollout of update [0-9]+ .*raise --num-steps"):
        proxrl.train(env="corridor", env_factory=lambda: Corridor(1, 5), algo="ppo-clip", steps=8, num_envs=1,
                     num_steps=1, num_minibatches=1, out=str(tmp_path / "r"), progress="off")


def test_same_seed_same_run_bit_for_bit(tmp_path):
    a = _short("ppo-clip", tmp_path / "a", obs_norm=True, reward_norm=True)
    b = _short("ppo-clip", tmp_path / "b", obs_norm=True, reward_norm=True)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("sps", "time")} for m in ms]
    assert strip(a.metrics) == strip(b.metrics)
    from safetensors.torch import load_file
    from proxrl.run import checkpoint

    ta = load_file(str(checkpoint.latest(a.run_dir / "checkpoints") / "tensors.safetensors"))
    tb = load_file(str(checkpoint.latest(b.run_dir / "checkpoints") / "tensors.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_normalisation_statistics_are_saved_and_used(tmp_path):
    res = _short("ppo-clip", tmp_path, env="Pendulum-v1", obs_norm=True, reward_norm=True)
    agent = proxrl.load(res.run_dir)
    assert agent.obs_rms is not None and agent.obs_rms.count > 1000
    assert not np.allclose(agent.obs_rms.mean, 0)


def test_categorical_sampler_is_exact():
    """The inverse-CDF sampler of the gym path draws each action with its probability (4σ bounds over
    200k draws), never draws a zero-probability action, and keeps the batch shape and integer dtype."""
    from proxrl.gym.policy import _Categorical

    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -1.0, float("-inf")], [2.0, 0.0, 0.0, 0.0], [-30.0, 0.0, -30.0, -30.0]])
    d = _Categorical(logits)
    n = 200_000
    draws = torch.stack([d.sample() for _ in range(n)])
    assert draws.dtype == torch.int64 and draws.shape == (n, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=4).double() / n
        p = d.probs[row].double()
        assert torch.all((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / n) + 1e-12), (row, freq, p)
    assert (draws[:, 0] != 3).all()
    assert _Categorical(torch.randn(3, 5, 2)).sample().shape == (3, 5)

@pytest.mark.parametrize("kind", ["discrete", "multidiscrete", "continuous"])
def test_rank_rows_in_a_batch_of_the_runs_shape_are_one_process_rows(kind):
    """What a gym rank samples from (Runner._sample): its rows at their global positions in a zero-padded batch
    of the run's shape give, bit for bit, the rows and draws of one process's whole batch (Discrete,
    MultiDiscrete, Box). A batch of the rank's rows alone would not: CPU matrix products block by shape, so a
    row's last bit depends on the batch size, and a chaotic env (MuJoCo) grows that bit into another run."""
    from proxrl.gym.policy import ActorCritic

    nvec = [3, 2, 4]
    pol = ActorCritic(17, kind, 6 if kind != "discrete" else 4, nvec=nvec if kind == "multidiscrete" else ())
    for n in (4, 5, 6, 7, 8, 13):
        obs = torch.randn(n, 17, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            torch.manual_seed(11)
            whole = pol.dist(obs).sample()
            for rows in (slice(0, n // 2), slice(n // 2, n), slice(1, n - 1)):
                full = torch.zeros_like(obs)
                full[rows] = obs[rows]
                torch.manual_seed(11)
                assert torch.equal(pol.dist(full).sample()[rows], whole[rows]), (n, rows)
