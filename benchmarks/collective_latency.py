"""What one collective costs between 2 CPU processes on this machine (gloo), against a plain loopback round trip.

    python benchmarks/collective_latency.py

The gym's scale-out exchanges (benchmarks/scale.py --gym) are latency-bound: a minibatch step of the gym's
MLPs takes about a millisecond, a rollout step less. This measures the all-reduce of 1 and 5,000 float32s
(the size of a CartPole actor-critic's gradient) with the ranks idle in between and after 1 ms of compute,
and a TCP ping-pong on 127.0.0.1 between two processes (the transport gloo uses). Medians and p90 of 500
calls. Writes results/collective-latency.{json,md}.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, machine


def _worker() -> None:
    import torch
    import torch.distributed as td

    td.init_process_group("gloo")
    rank, out = td.get_rank(), {}

    def busy():
        t = time.perf_counter()
        while time.perf_counter() - t < 1e-3:
            pass

    for n in (1, 5000):
        x = torch.zeros(n)
        for name, pre in (("idle", lambda: None), ("after 1 ms compute", busy)):
            for _ in range(30):
                td.all_reduce(x)
            ts = []
            for _ in range(500):
                pre()
                t = time.perf_counter()
                td.all_reduce(x)
                ts.append(time.perf_counter() - t)
            ts.sort()
            out[f"all_reduce {n} float32, {name}"] = {"median_us": ts[250] * 1e6, "p90_us": ts[450] * 1e6,
                                                      "mean_us": statistics.mean(ts) * 1e6}
    if rank == 0:
        print(json.dumps(out))
    td.destroy_process_group()


def _ping_pong() -> dict:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the echo side
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(2100):
            c.sendall(c.recv(64))
        os._exit(0)
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ts = []
    for _ in range(2100):
        t = time.perf_counter()
        c.sendall(b"x" * 8)
        c.recv(64)
        ts.append(time.perf_counter() - t)
    os.waitpid(pid, 0)
    ts = sorted(ts[100:])
    return {"median_us": ts[1000] * 1e6, "p90_us": ts[1800] * 1e6, "mean_us": statistics.mean(ts) * 1e6}


def main() -> int:
    if os.environ.get("RANK") is not None:
        _worker()
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__], capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["TCP round trip on 127.0.0.1 (8 bytes)"] = _ping_pong()
    Path(RESULTS / "collective-latency.json").write_text(json.dumps({"machine": machine(None), **res}, indent=2))
    md = ["# One collective between 2 CPU processes (gloo) vs a loopback round trip", "",
          "| what | median µs | p90 µs | mean µs |", "|---|---|---|---|"]
    md += [f"| {k} | {v['median_us']:.0f} | {v['p90_us']:.0f} | {v['mean_us']:.0f} |" for k, v in res.items()]
    Path(RESULTS / "collective-latency.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
