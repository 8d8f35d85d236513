"""proxrl side of the peer benchmarks; run by the benchmark scripts in a fresh process.
argv[1] is a JSON task; the last stdout line is the JSON result."""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time

import torch

from _evalcore import evaluate, warm_torch_optim


def solve(task: dict) -> dict:
    import proxrl

    warm_torch_optim()
    every, threshold = task["eval_every"], task["threshold"]
    st = {"next": every, "eval_time": 0.0, "curve": [], "solved": None}

    def callback(line, agent):
        if line["step"] < st["next"]:
            return False
        now = time.perf_counter()
        train_time = now - start - st["eval_time"]
        ret = evaluate(lambda o: agent.act(o, True), task["env"], task["episodes"])
        st["eval_time"] += time.perf_counter() - now
        st["next"] += every
        st["curve"].append([line["step"], train_time, ret])
        if ret >= threshold:
            st["solved"] = {"steps": line["step"], "time": train_time, "time_with_eval": time.perf_counter() - start}
            return True
        return False

    with tempfile.TemporaryDirectory() as out:
        start, cpu0 = time.perf_counter(), time.process_time()
        proxrl.train(env=task["env"], algo=task["algo"], steps=task["budget"], seed=task["seed"], out=out,
                     progress="off", torch_threads=task["threads"], callback=callback)
        total = time.perf_counter() - start
    return {"solved": st["solved"], "curve": st["curve"], "total_time": total, "eval_time": st["eval_time"]}


def throughput(task: dict) -> dict:
    import proxrl

    warm_torch_optim()
    with tempfile.TemporaryDirectory() as out:
        start, cpu0 = time.perf_counter(), time.process_time()
        r = proxrl.train(env=task["env"], algo="ppo-clip", preset="none", steps=task["steps"], seed=task["seed"],
                         out=out, progress="off", torch_threads=task["threads"], **task["proxrl"])
        wall = time.perf_counter() - start
    steps = r.metrics[-1]["step"]
    return {"steps": steps, "time": wall, "sps": steps / wall, "cpu_time": time.process_time() - cpu0, "final_return": r.final_return}


def learn(task: dict) -> dict:
    """A full training run at the env's preset (e.g. HalfCheetah-v5, 1M steps), then a final deterministic
    evaluation; the curve is the mean return of the last 10 training rollouts' episodes every ``curve_every`` env steps."""
    import proxrl

    warm_torch_optim()
    curve, st, last = [], {"next": 0}, collections.deque(maxlen=10)

    def callback(line, agent):
        if line["episode_return"] is not None:
            last.append(line["episode_return"])
        if line["step"] >= st["next"] and last:
            curve.append([line["step"], time.perf_counter() - start, sum(last) / len(last)])
            st["next"] = line["step"] + task["curve_every"]
        return False

    with tempfile.TemporaryDirectory() as out:
        start, cpu0 = time.perf_counter(), time.process_time()
        r = proxrl.train(env=task["env"], algo=task["algo"], steps=task["steps"], seed=task["seed"], out=out,
                         progress="off", torch_threads=task["threads"], callback=callback)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        agent = proxrl.load(out)
        ret = evaluate(lambda o: agent.act(o, True), task["env"], task["episodes"])
    return {"steps": r.metrics[-1]["step"], "time": wall, "cpu_time": cpu, "eval_return": ret,
            "final_train_return": r.final_return, "curve": curve}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    print(json.dumps({"solve": solve, "throughput": throughput, "learn": learn}[task["kind"]](task)))
