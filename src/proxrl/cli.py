"""The ``proxrl`` command: train, eval, ladder, plot, rlhf.

Options come from typed dataclasses (tyro); field docstrings are the help. User errors (bad values,
unknown env, malformed files) print one line ``error: <field>: <problem> (<fix>)`` and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Optional

USAGE = """usage: proxrl COMMAND [OPTIONS]

commands:
  train    train one rung of the ladder on a Gymnasium environment
  eval     evaluate a saved run: prints {"mean_return", "std_return", "episodes"}
  ladder   run every rung × seed on one environment (--lm: on a language-model task); writes ladder.md and ladder.png
  plot     draw learning curves of runs
  rlhf     language models: sft, rm, ppo, demo, export
  export   a trained LM run as a Hugging Face model directory

`proxrl COMMAND --help` lists the options of a command."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line ``error: <field>: <problem>`` (exit 2), not usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        from .errors import ConfigError

        m = re.match(r"argument (-*)([\w-]+)(?:/[\w-]+)*: (.*)", message)
        if m:
            raise ConfigError(m.group(2).replace("-", "_"), m.group(3), f"see `{self.prog} --help`")
        m = re.match(r"the following arguments are required: ([\w-]+)", message)
        if m:
            raise ConfigError(m.group(1), "required argument missing", f"see `{self.prog} --help`")
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            raise ConfigError(m.group(1).lstrip("-").replace("-", "_") or "arguments",
                              f"unrecognized argument {m.group(1)!r}", f"see `{self.prog} --help`")
        raise ConfigError("arguments", message.splitlines()[0] if message else "invalid", f"see `{self.prog} --help`")


_SECTION_END = re.compile(r"\s(?:Got errors:|Argument helptext:|For full helptext|Perhaps you meant)")


def _tyro_error(text: str, prog: str):
    """(field, problem) from tyro's error panel (unicode or ASCII box, any width): box drawing removed,
    lines joined, then the first sentence of the panel is matched."""
    flat = re.sub(r"(?m)[╭╮╰╯│─┌┐└┘├┤┃━]+|(?:^|\s)[+|]?-{3,}[+|]?(?=\s|$)|^\s*[|+]|[|+]\s*$", " ", text)
    flat = re.sub(r"\s+", " ", flat).strip()
    cut = _SECTION_END.search(" " + flat)
    msg = (" " + flat)[: cut.start()].strip() if cut else flat
    m = re.search(r"Error parsing (--[\w.-]+): (.*)", msg)
    if m:
        return m.group(1)[2:].replace("-", "_"), f"cannot parse the value: {m.group(2)}"
    m = re.search(r"argument '(--[\w.-]+)'", msg)
    if m:
        first = re.search(r"(?:invalid choice|Missing value) .*", msg)  # drop the panel title
        return m.group(1)[2:].replace("-", "_"), first.group(0) if first else msg
    m = re.search(r"Unrecognized options?: (\S+)", msg)
    if m:
        tok = m.group(1).rstrip(",")  # tyro lists several as "--a, --b"
        if tok.startswith("-"):
            return tok.lstrip("-").replace("-", "_"), f"unknown option {tok}"
        return "arguments", f"unexpected argument {tok!r}"
    return "arguments", msg[:300] or "invalid arguments"


def tyro_cli(cls, args: list[str], prog: str, **kwargs):
    """``tyro.cli`` whose parse errors become one :class:`~proxrl.errors.ConfigError` line (exit 2 through
    :func:`main`) instead of a multi-line panel. ``--help`` goes to stdout untouched."""
    import contextlib
    import io

    import tyro

    from .errors import ConfigError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out = tyro.cli(cls, args=args, prog=prog, **kwargs)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(err.getvalue())
            raise
        field, problem = _tyro_error(err.getvalue(), prog)
        raise ConfigError(field, problem, f"see `{prog} --help`") from None
    sys.stderr.write(err.getvalue())
    return out


def given_fields(argv: list[str], names) -> set[str]:
    """Field names of the options written on the command line (``--num-envs 4``, ``--num_envs=4``,
    ``--no-anneal-lr``), so that ``--resume`` can refuse the ones that would change the saved run (gym and
    LM commands alike)."""
    given = set()
    for tok in argv:
        if tok == "--":
            break
        if not tok.startswith("--"):
            continue
        name = tok[2:].split("=", 1)[0].replace("-", "_")
        if name not in names and name.startswith("no_") and name[3:] in names:
            name = name[3:]
        if name in names:
            given.add(name)
    return given


def _train(argv: list[str]) -> int:
    from .gym.config import FIELD_NAMES, TrainConfig, resolve, validate
    from .gym.trainer import train

    quiet = [a for a in argv if a in ("--quiet", "-q")]
    if quiet:
        argv = [a for a in argv if a not in ("--quiet", "-q")]
        if any(a == "--progress" or a.startswith("--progress=") for a in argv):
            from .errors import ConfigError

            raise ConfigError("quiet", "--quiet and --progress both set the progress output", "give one of them")
        argv = argv + ["--progress", "off"]
    pre = _OneLineParser(prog="proxrl train", add_help=False)
    pre.add_argument("--env")
    pre.add_argument("--algo")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    explicit = {k: v for k, v in vars(known).items() if v is not None}
    base, _ = resolve(explicit)  # defaults → rung → preset; the options below override it
    cfg = tyro_cli(TrainConfig, args=argv, prog="proxrl train", default=base,
                   description="Train one rung of the ladder on a Gymnasium environment. Progress goes to "
                               "stderr, the result (one JSON line) to stdout; --quiet (-q) turns progress off.")
    cfg = dataclasses.replace(cfg, preset=base.preset)
    if not cfg.resume:  # a resumed run is validated on its saved config (train → _resolve_resume)
        validate(cfg)
    given = given_fields(argv, FIELD_NAMES)
    if quiet:
        given.discard("progress")
    result = train(cfg, explicit=given)
    from .run.dist import context

    if context().main:  # one result line, also on several processes (every rank ran the same run)
        print(json.dumps({"run_dir": str(result.run_dir), "steps": result.metrics[-1]["step"],
                          "final_episode_return": result.final_return}))
    return 0


def _eval(argv: list[str]) -> int:
    from .gym.trainer import evaluate

    p = _OneLineParser(prog="proxrl eval", description="Evaluate a saved run over full episodes.")
    p.add_argument("run_dir", help="run directory written by `proxrl train`")
    p.add_argument("--episodes", type=int, default=20, help="episodes to average over (default 20)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the evaluation environments")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of the most likely one")
    a = p.parse_args(argv)
    print(json.dumps(evaluate(a.run_dir, a.episodes, a.seed, deterministic=not a.stochastic)))
    return 0


def _ladder(argv: list[str]) -> int:
    if "--lm" in argv:  # the ladder on tokens: the same comparison on a language-model task
        from .lm.config import LMLadderConfig
        from .lm.ladder import run_lm_ladder

        cfg = tyro_cli(LMLadderConfig, args=[a for a in argv if a != "--lm"], prog="proxrl ladder --lm",
                       description="Run every rung of the ladder on tokens × seeds on one policy, reward and "
                                   "prompts, and draw the comparison.")
        out = run_lm_ladder(cfg)
        print(json.dumps({"ladder_md": str(out / "ladder.md"), "ladder_png": str(out / "ladder.png")}))
        return 0
    from .gym.ladder import LadderConfig, run_ladder
    cfg = tyro_cli(LadderConfig, args=argv, prog="proxrl ladder",
                   description="Run every rung × seed on one environment and draw the comparison "
                               "(--lm: on a language-model task).")
    out = run_ladder(cfg)
    print(json.dumps({"ladder_md": str(out / "ladder.md"), "ladder_png": str(out / "ladder.png")}))
    return 0


def _plot(argv: list[str]) -> int:
    from .run.plot import plot_runs

    p = _OneLineParser(prog="proxrl plot", description="Draw learning curves of runs.")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="output image (default curves.png)")
    p.add_argument("--metric", default="episode_return", help="metric against env steps (default episode_return)")
    a = p.parse_args(argv)
    print(json.dumps({"plot": str(plot_runs(a.runs, a.out, a.metric))}))
    return 0


def _rlhf(argv: list[str]) -> int:
    from .lm.cli import main as lm_main

    return lm_main(argv)


def _export(argv: list[str]) -> int:
    from .lm.cli import main as lm_main

    return lm_main(["export", *argv])


COMMANDS = {"train": _train, "eval": _eval, "ladder": _ladder, "plot": _plot, "rlhf": _rlhf, "export": _export}


def main(argv: Optional[list[str]] = None) -> int:
    from .errors import ProxrlError, say

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"proxrl {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    single = argv[0] in ("eval", "ladder", "plot", "export") or argv[:2] == ["rlhf", "demo"]
    if command is None:
        say(f"error: command: unknown command {argv[0]!r} (choose one of {', '.join(COMMANDS)})")
        return 2
    from .run.signals import RunInterrupted

    try:
        if single:
            from .run.dist import refuse_several_processes

            refuse_several_processes(" ".join(argv[:2]) if argv[0] == "rlhf" else argv[0])
        return command(argv[1:])
    except RunInterrupted as e:
        say(f"stopped: {e}")
        return e.exit_code
    except ProxrlError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        from .run.signals import StoppedAtOnce

        if isinstance(e, StoppedAtOnce):
            say(f"stopped: {e}")
            return e.exit_code
        say("error: interrupted")
        return 130
    except OSError as e:  # the disk under a run's files (metrics, samples, config, summary) full or failing
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG):
            raise
        where = f" {e.filename}" if e.filename else ""
        fix = {errno.EROFS: "make it writable", errno.EIO: "check the disk"}.get(e.errno, "free disk space")
        say(f"error: disk: cannot write{where} ({e.strerror}) ({fix}; a run resumes from its last complete "
            "checkpoint with --resume)")
        return 2
    except (MemoryError, RuntimeError) as e:  # torch's allocator failing (CPU RuntimeError, CUDA OutOfMemoryError)
        text = str(e).strip()
        if not isinstance(e, MemoryError) and "allocate" not in text and "out of memory" not in text.lower():
            raise
        first = (text.splitlines() or [type(e).__name__])[0][:160]
        say(f"error: memory: out of memory ({first}) (lower the sizes: --num-envs, --num-steps, --hidden, "
            "--batch-size, --micro-batch-size, --episodes)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
