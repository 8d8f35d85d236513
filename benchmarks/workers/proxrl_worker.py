"""proxrl side of the peer benchmarks; run by the benchmark scripts in a fresh process.
argv[1] is a JSON task; the last stdout line is the JSON result."""

from __future__ import annotations

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


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    print(json.dumps({"solve": solve, "throughput": throughput}[task["kind"]](task)))
