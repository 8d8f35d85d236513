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
    return {"solved": cb.solved, "curve": cb.curve, "total_time": total, "eval_time": cb.eval_time}


def throughput(task: dict) -> dict:
    warm_torch_optim()
    start, cpu0 = time.perf_counter(), time.process_time()
    model = _make(task, task["sb3"])
    model.learn(task["steps"])
    wall = time.perf_counter() - start
    return {"steps": int(model.num_timesteps), "time": wall, "sps": model.num_timesteps / wall, "cpu_time": time.process_time() - cpu0}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    print(json.dumps({"solve": solve, "throughput": throughput}[task["kind"]](task)))
