"""Stable-Baselines3 side of the peer benchmarks; runs in the peers' venv (benchmarks/setup_peers.sh).
argv[1] is a JSON task; the last stdout line is the JSON result."""

from __future__ import annotations

import json
import sys
import time

import torch

from _evalcore import evaluate, warm_torch_optim


def _linear(v0: float):
    return lambda progress_remaining: progress_remaining * v0  # rl-zoo's lin_<v0>


def _make(task: dict, hp: dict):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    hp = dict(hp)
    n_envs = hp.pop("n_envs")
    for k in ("learning_rate", "clip_range"):
        if isinstance(hp.get(k), str) and hp[k].startswith("lin_"):
            hp[k] = _linear(float(hp[k][4:]))
    if "net_arch" in hp:
        hp["policy_kwargs"] = dict(net_arch=dict(pi=hp["net_arch"], vf=hp.pop("net_arch")),
                                   activation_fn=torch.nn.Tanh)
    env = make_vec_env(task["env"], n_envs=n_envs, seed=task["seed"])
    return PPO("MlpPolicy", env, seed=task["seed"], verbose=0, device="cpu", **hp)


def solve(task: dict) -> dict:
    from stable_baselines3.common.callbacks import BaseCallback

    warm_torch_optim()
    every, threshold = task["eval_every"], task["threshold"]

    class EvalStop(BaseCallback):
        """Evaluates right after an update (at the start of the next rollout), like the proxrl side."""

        def __init__(self):
            super().__init__()
            self.next, self.eval_time, self.curve, self.solved = every, 0.0, [], None

        def _eval(self):
            now = time.perf_counter()
            train_time = now - start - self.eval_time
            ret = evaluate(lambda o: self.model.predict(o, deterministic=True)[0], task["env"], task["episodes"])
            self.eval_time += time.perf_counter() - now
            self.next += every
            self.curve.append([int(self.num_timesteps), train_time, ret])
            if ret >= threshold:
                self.solved = {"steps": int(self.num_timesteps), "time": train_time,
                               "time_with_eval": time.perf_counter() - start}

        def _on_rollout_start(self):
            if self.solved is None and self.num_timesteps >= self.next:
                self._eval()

        def _on_training_end(self):
            if self.solved is None and self.num_timesteps >= self.next:
                self._eval()

        def _on_step(self) -> bool:
            return self.solved is None

    start, cpu0 = time.perf_counter(), time.process_time()
    model = _make(task, task["sb3"])
    cb = EvalStop()
    model.learn(task["budget"], callback=cb)
    total = time.perf_counter() - start
    return {"solved": cb.solved, "curve": cb.curve, "total_time": total, "eval_time": cb.eval_time, "total_cpu_time": time.process_time() - cpu0}


def throughput(task: dict) -> dict:
    warm_torch_optim()
    start, cpu0 = time.perf_counter(), time.process_time()
    model = _make(task, task["sb3"])
    model.learn(task["steps"])
    wall = time.perf_counter() - start
    return {"steps": int(model.num_timesteps), "time": wall, "sps": model.num_timesteps / wall, "cpu_time": time.process_time() - cpu0}


def learn(task: dict) -> dict:
    """rl-zoo style run (``normalize: true`` = VecNormalize with the algo's γ), then a final deterministic
    evaluation with the frozen observation statistics; curve = mean of the last 10 training episodes."""
    import numpy as np
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    warm_torch_optim()
    hp = dict(task["sb3"])
    algo, n_envs, normalize = hp.pop("algo"), hp.pop("n_envs"), hp.pop("normalize", False)
    if "policy_kwargs" in hp:
        pk = dict(hp["policy_kwargs"])
        pk["activation_fn"] = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[pk.get("activation_fn", "tanh")]
        hp["policy_kwargs"] = pk
    curve = []

    class Curve(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = 0

        def _on_rollout_end(self):
            buf = self.model.ep_info_buffer
            if self.num_timesteps >= self.next and buf:
                curve.append([int(self.num_timesteps), time.perf_counter() - start,
                              float(np.mean([e["r"] for e in buf]))])
                self.next = self.num_timesteps + task["curve_every"]

        def _on_step(self) -> bool:
            return True

    start, cpu0 = time.perf_counter(), time.process_time()
    env = make_vec_env(task["env"], n_envs=n_envs, seed=task["seed"])
    if normalize:
        env = VecNormalize(env, gamma=hp.get("gamma", 0.99))
    if algo == "trpo":
        from sb3_contrib import TRPO as Algo
    else:
        from stable_baselines3 import PPO as Algo
    model = Algo("MlpPolicy", env, seed=task["seed"], verbose=0, device="cpu", stats_window_size=10, **hp)
    model.learn(task["steps"], callback=Curve())
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    if normalize:
        env.training = False
        act = lambda o: model.predict(env.normalize_obs(o), deterministic=True)[0]
    else:
        act = lambda o: model.predict(o, deterministic=True)[0]
    ret = evaluate(act, task["env"], task["episodes"])
    buf = model.ep_info_buffer
    return {"steps": int(model.num_timesteps), "time": wall, "cpu_time": cpu, "eval_return": ret,
            "final_train_return": float(np.mean([e["r"] for e in buf])) if buf else None, "curve": curve}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    print(json.dumps({"solve": solve, "throughput": throughput, "learn": learn}[task["kind"]](task)))
