"""``proxrl rlhf sft|rm|ppo|train|demo`` — one typed config per command (tyro: field docstrings are the help).

User errors (:class:`~proxrl.errors.ProxrlError`) print one line ``error: …`` on stderr and exit 2.
SIGINT/SIGTERM during ``ppo`` finish the update, write a checkpoint, print ``stopped: …`` and exit 130/143;
``proxrl rlhf ppo --resume DIR`` continues the run exactly (an option given with it that differs from the run
is refused, except ``--updates``, raised to extend it). An ``--out`` that already holds a run is refused unless
``--resume`` (ppo, train) or ``--overwrite``.
"""

from __future__ import annotations

import sys

from ..errors import ProxrlError, say

USAGE = """usage: proxrl rlhf {sft,rm,ppo,train,demo} [options]

  sft    supervised fine-tuning on {"prompt","response"} or chat "messages" records
  rm     reward model (Bradley–Terry) on {"prompt","chosen","rejected"} records
  ppo    PPO against a reward-model directory or a Python function module:function
  train  any rung of the ladder on tokens: --algo pg|pg-baseline|rloo|grpo|pg-rtg|is-pg|ppo-kl|ppo-clip|trpo
  demo   the whole pipeline offline: SmolLM2-135M-Instruct (GGUF) + LoRA + VADER sentiment reward
  export a trained run as a Hugging Face model directory (also: proxrl export RUN --out DIR)

Run `proxrl rlhf COMMAND --help` for the options of a command."""


def given_options(argv: list[str], names: set[str]) -> list[str]:
    """The fields given on the command line (:func:`proxrl.cli.given_fields`), sorted."""
    from ..cli import given_fields

    return sorted(given_fields(argv, names))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    from . import config as C

    from .export import ExportConfig

    commands = {"sft": C.SFTConfig, "rm": C.RMConfig, "ppo": C.PPOConfig, "train": C.RLConfig, "demo": C.DemoConfig,
                "export": ExportConfig}
    if cmd not in commands:
        say(f"error: unknown rlhf command {cmd!r}; choose one of {', '.join(commands)}")
        return 2
    if cmd == "export" and rest and not rest[0].startswith("-"):
        rest = ["--run", *rest]  # proxrl export RUN --out DIR
    from ..cli import tyro_cli

    try:
        cfg = tyro_cli(commands[cmd], args=rest, prog=f"proxrl rlhf {cmd}")
        given = given_options(rest, set(commands[cmd].__dataclass_fields__))  # --resume refuses those that change the run
        if cmd == "sft":
            from .sft_trainer import sft
            sft(cfg, explicit=given)
        elif cmd == "rm":
            from .rm import reward_model
            reward_model(cfg, explicit=given)
        elif cmd in ("ppo", "train"):
            from .ppo_trainer import ppo

            ppo(cfg, explicit=given)
        elif cmd == "export":
            import json

            from .export import export
            print(json.dumps(export(cfg)))
        else:
            from .demo_pipeline import demo
            demo(cfg)
    except ProxrlError as e:
        if hasattr(e, "exit_code"):  # PPOInterrupted: SIGINT/SIGTERM, checkpoint written → 130/143
            say(f"stopped: {e}")
            return e.exit_code
        say(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
