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
    return {"solved": st["solved"], "curve": st["curve"], "total_time": total, "eval_time": st["eval_time"], "total_cpu_time": time.process_time() - cpu0}


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


def rlhf_update(task: dict) -> dict:
    """Time PPO updates (generate → score → step) of a tiny GPT-2 policy, fully fine-tuned, with a separate
    value model and a reward model (a GPT-2 trunk with a scalar head), configured like the TRL side."""
    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import ModelOptions, PPOConfig
    from proxrl.lm.policy import build_reward_model
    from proxrl.lm.loading import freeze

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    warm_torch_optim()
    cfg = PPOConfig(policy=task["policy"], finetune="full", critic="separate", chat_template="off",
                    batch_size=task["batch_size"], num_minibatches=task["num_minibatches"],
                    micro_batch_size=task["micro_batch_size"], update_epochs=task["epochs"],
                    response_length=task["response_length"], temperature=task["temperature"], lr=task["lr"],
                    kl_coef=task["kl_coef"], adaptive_kl=False, missing_eos_penalty=1.0, seed=task["seed"],
                    max_prompt_length=max(1, min(512, task.get("context", 512) - task["response_length"])))
    rm = freeze(build_reward_model(task["policy"], ModelOptions(finetune="full", chat_template="off",
                                                                 seed=task["seed"] + 1)))
    trainer = PPOTrainer(cfg, reward=rm)
    prompts, B = task["prompts"], task["batch_size"]
    times, gen, fwd, train, cpu = [], [], [], [], []
    for u in range(task["updates"]):
        batch = [prompts[(u * B + i) % len(prompts)] for i in range(B)]
        t0, c0 = time.perf_counter(), time.process_time()
        rollout = trainer.generate(batch)
        t1 = time.perf_counter()
        m = trainer.step(rollout, trainer.score(rollout))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        gen.append(t1 - t0)
        fwd.append(m["forward_time"])
        train.append(m["train_time"])
    import statistics

    import transformers

    return {"update_times": times, "generation_times": gen, "forward_times": fwd, "train_times": train,
            "cpu_times": cpu, "median_update_excl_first": statistics.median(times[1:] or times),
            "torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    kinds = {"solve": solve, "throughput": throughput, "learn": learn, "rlhf_update": rlhf_update}
    print(json.dumps(kinds[task["kind"]](task)))
