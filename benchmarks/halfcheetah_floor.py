"""How low can a HalfCheetah-v5 run at the rl-zoo's PPO settings go on this CPU? The floor of its two costs,
measured in one process with 1 thread (both sides of the comparison use 1):

* the update: per minibatch step the matrix products of the zoo's networks alone — actor and critic, each
  17 → 256 → 256 → out (ReLU), forward and backward (input and weight gradients) on 64 samples — timed as
  bare ``torch.addmm``/``mm`` calls, no activation, loss, clip or optimizer; × 20 epochs × 8 minibatches per
  512 steps;
* the rollout: one ``env.step`` of HalfCheetah-v5 (MuJoCo physics alone, no policy) per environment step.

Their sum × the run's steps is a floor no implementation on these kernels can go under; a whole run (``proxrl
train``, the ``HalfCheetah-v5/ppo-clip`` preset) is timed beside it.

    python benchmarks/halfcheetah_floor.py [--steps 20480] [--tag s9]     # results/halfcheetah_floor-<tag>.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from _common import command_line, machine, write_json


def matmul_floor_us(reps: int = 5, n: int = 300) -> float:
    """µs per minibatch step of the bare matrix products (forward + backward) of the zoo's actor and critic."""
    B, D, H = 64, 17, 256
    g = torch.Generator().manual_seed(0)
    nets = [[torch.randn(H, D, generator=g), torch.randn(H, H, generator=g), torch.randn(o, H, generator=g)]
            for o in (6, 1)]
    biases = [[torch.zeros(H), torch.zeros(H), torch.zeros(o)] for o in (6, 1)]
    x = torch.randn(B, D, generator=g)

    def step():
        for ws, bs in zip(nets, biases):
            acts = [x]
            for w, b in zip(ws, bs):  # forward
                acts.append(torch.addmm(b, acts[-1], w.t()))
            grad = torch.ones_like(acts[-1])
            for i in range(len(ws) - 1, -1, -1):  # backward: weight and input gradients
                torch.mm(grad.t(), acts[i])
                if i:
                    grad = torch.mm(grad, ws[i])

    for _ in range(50):
        step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            step()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def env_step_us(n: int = 3000) -> float:
    import gymnasium as gym
    import numpy as np

    env = gym.make("HalfCheetah-v5")
    env.reset(seed=0)
    a = np.zeros(env.action_space.shape, np.float32)
    for _ in range(100):
        env.step(a)
    t = time.perf_counter()
    for _ in range(n):
        env.step(a)  # HalfCheetah never terminates; its TimeLimit truncates at 1000 steps (the step still counts)
    out = (time.perf_counter() - t) / n * 1e6
    env.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_480)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mm = matmul_floor_us()
    env = env_step_us()
    minibatch_steps = args.steps / 512 * 20 * 8
    floor = (mm * minibatch_steps + env * args.steps) / 1e6
    import proxrl

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch's first optimizer imports torch._dynamo
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        proxrl.train(env="HalfCheetah-v5", algo="ppo-clip", steps=args.steps, seed=1, out=d + "/r", progress="off",
                     torch_threads=1)
        run = time.perf_counter() - t
    res = {"steps": args.steps, "matmul_us_per_minibatch_step": mm, "env_step_us": env,
           "floor_s": floor, "floor_update_s": mm * minibatch_steps / 1e6, "floor_env_s": env * args.steps / 1e6,
           "proxrl_run_s": run, "floor_fraction_of_run": floor / run}
    print(f"{args.steps} steps: matmul floor {mm:.0f} µs per minibatch step × {minibatch_steps:.0f} = "
          f"{res['floor_update_s']:.1f} s; env steps {env:.1f} µs × {args.steps} = {res['floor_env_s']:.1f} s; "
          f"floor {floor:.1f} s; proxrl run {run:.1f} s (the floor is {100 * floor / run:.0f} % of it)")
    write_json(f"halfcheetah_floor{'-' + args.tag if args.tag else ''}.json",
               {"command": command_line("halfcheetah_floor.py", sys.argv[1:] if argv is None else argv),
                "machine": machine(None), "results": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
