"""The ``proxrl`` command: train, eval, ladder, plot, rlhf.

Options come from typed dataclasses (tyro); field docstrings are the help. User errors (bad values,
unknown env, malformed files) print one line ``error: <field>: <problem> (<fix>)`` and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

USAGE = """usage: proxrl COMMAND [OPTIONS]

commands:
  train    train one rung of the ladder on a Gymnasium environment
  eval     evaluate a saved run: prints {"mean_return", "std_return", "episodes"}
  ladder   run every rung × seed on one environment; writes ladder.md and ladder.png
  plot     draw learning curves of runs
  rlhf     language models: sft, rm, ppo, demo

`proxrl COMMAND --help` lists the options of a command."""


def _train(argv: list[str]) -> int:
    from .config import TrainConfig, resolve, validate
    from .trainer import train

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env")
    pre.add_argument("--algo")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    explicit = {k: v for k, v in vars(known).items() if v is not None}
    base, _ = resolve(explicit)  # defaults → rung → preset; the options below override it
    import tyro

    cfg = tyro.cli(TrainConfig, args=argv, prog="proxrl train", default=base,
                   description="Train one rung of the ladder on a Gymnasium environment.")
    cfg = dataclasses.replace(cfg, preset=base.preset)
    validate(cfg)
    result = train(cfg)
    last = result.final_return
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.metrics[-1]["step"],
                      "final_episode_return": last}))
    return 0


def _eval(argv: list[str]) -> int:
    from .trainer import evaluate

    p = argparse.ArgumentParser(prog="proxrl eval", description="Evaluate a saved run over full episodes.")
    p.add_argument("run_dir", help="run directory written by `proxrl train`")
    p.add_argument("--episodes", type=int, default=20, help="episodes to average over (default 20)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the evaluation environments")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of the most likely one")
    a = p.parse_args(argv)
    print(json.dumps(evaluate(a.run_dir, a.episodes, a.seed, deterministic=not a.stochastic)))
    return 0


def _ladder(argv: list[str]) -> int:
    from .ladder import LadderConfig, run_ladder
    import tyro

    cfg = tyro.cli(LadderConfig, args=argv, prog="proxrl ladder",
                   description="Run every rung × seed on one environment and draw the comparison.")
    out = run_ladder(cfg)
    print(json.dumps({"ladder_md": str(out / "ladder.md"), "ladder_png": str(out / "ladder.png")}))
    return 0


def _plot(argv: list[str]) -> int:
    from .plot import plot_runs

    p = argparse.ArgumentParser(prog="proxrl plot", description="Draw learning curves of runs.")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="output image (default curves.png)")
    p.add_argument("--metric", default="episode_return", help="metric against env steps (default episode_return)")
    a = p.parse_args(argv)
    print(json.dumps({"plot": str(plot_runs(a.runs, a.out, a.metric))}))
    return 0


def _rlhf(argv: list[str]) -> int:
    from .lm.cli import main as lm_main

    return lm_main(argv)


COMMANDS = {"train": _train, "eval": _eval, "ladder": _ladder, "plot": _plot, "rlhf": _rlhf}


def main(argv: Optional[list[str]] = None) -> int:
    from .errors import ProxrlError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"proxrl {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: command: unknown command {argv[0]!r} (choose one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except ProxrlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
