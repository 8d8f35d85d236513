"""Shared pieces of the peer benchmarks: machine facts, the evaluator, medians, running a worker.

Every benchmark runs proxrl and its peer in separate fresh processes, interleaved seed by seed in the same
run, so both see the same machine load. The peer runs in its own virtual environment (``--peer-python``,
created by ``benchmarks/setup_peers.sh``); it is never a dependency of proxrl.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = Path(os.environ.get("PROXRL_BENCH_RESULTS", HERE / "results"))  # overridden by the smoke test
WORKERS = HERE / "workers"
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing proxrl
    sys.path.insert(0, str(ROOT / "src"))
DEFAULT_PEERS_VENV = Path(os.environ.get("PROXRL_PEERS_VENV", Path.home() / ".cache" / "proxrl-peers"))


def add_peer_args(ap) -> None:
    ap.add_argument("--peer-python", default=None,
                    help="python of the peers' venv (default: $PROXRL_PEERS_VENV/bin/python or "
                         "~/.cache/proxrl-peers/bin/python); created by benchmarks/setup_peers.sh")
    ap.add_argument("--setup-peers", action="store_true",
                    help="create the peers' venv first if it is missing (runs benchmarks/setup_peers.sh)")
    ap.add_argument("--no-peer", action="store_true", help="run proxrl only (CI smoke test: installs nothing)")


def peer_python(args) -> Optional[str]:
    if args.no_peer:
        return None
    py = Path(args.peer_python) if args.peer_python else DEFAULT_PEERS_VENV / "bin" / "python"
    if not py.exists():
        if args.setup_peers:
            venv = py.parent.parent
            subprocess.run(["bash", str(HERE / "setup_peers.sh"), str(venv)], check=True)
        else:
            sys.exit(f"peer python {py} not found: run `bash benchmarks/setup_peers.sh {py.parent.parent}` "
                     "or pass --setup-peers / --peer-python PATH / --no-peer")
    return str(py)


def run_worker(python: str, worker: str, task: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``workers/<worker>.py`` with ``task`` as JSON in a fresh process; its last stdout line is the result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", str(task.get("threads") or os.cpu_count()))
    proc = subprocess.run([python, str(WORKERS / f"{worker}.py"), json.dumps(task)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(peer: Optional[str]) -> dict[str, Any]:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if peer:
        out = subprocess.run([peer, "-c", "import torch, stable_baselines3 as s, gymnasium as g; "
                              "print(torch.__version__, s.__version__, g.__version__)"],
                             capture_output=True, text=True).stdout.split()
        if len(out) == 3:
            info.update(peer_torch=out[0], sb3=out[1], peer_gymnasium=out[2])
    return info


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


_ABS_PATH = re.compile(r"(?<![\w.:<~])/(?:[\w.+@-]+/)*[\w.+@-]+")


def portable(obj):
    """``obj`` with the paths of this machine replaced, so that committed results name no local directory:
    a path in the repository becomes relative to it, a peer's interpreter ``PEER_VENV/bin/python``, a
    temporary directory ``<tmp>/…``, anything else ``<local>/<last part>``."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    if not isinstance(obj, str):
        return obj

    def repl(m: "re.Match") -> str:
        path = m.group(0)
        root = str(ROOT)
        if path == root or path.startswith(root + "/"):
            return os.path.relpath(path, root)
        if path.endswith("/bin/python") or "/bin/python3" in path:
            return "PEER_VENV/bin/" + path.rsplit("/", 1)[1]
        tmp = tempfile.gettempdir()
        if path.startswith(tmp + "/"):
            return "<tmp>/" + path[len(tmp) + 1:].split("/", 1)[-1]
        return "<local>/" + path.rstrip("/").rsplit("/", 1)[-1]

    return _ABS_PATH.sub(repl, obj)


def command_line(script: str, argv) -> str:
    """How a result was produced, as committed: ``python benchmarks/<script> <args>`` without local paths."""
    return portable(" ".join([f"python benchmarks/{script}"] + list(argv)))


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(json.dumps(portable(data), indent=1) + "\n")
    return p
