"""``proxrl ladder --lm``: the ladder's story on tokens — every rung × seed on one task, side by side.

Each run is an ordinary ``rlhf train --algo RUNG`` run directory (``<out>/<rung>/seed<k>/``) with the same
policy, reward, prompts and budget. ``ladder.md`` / ``ladder.json`` / ``ladder.png`` compare: the training
reward per update, the held-out reward before and after, the KL to the reference, the importance-weight
variance of the off-policy rung (is-pg) and the cost — wall time per update and per generated token.
Every run's config is built and validated before the first one starts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable, Optional

from ..errors import ConfigError
from .config import LM_RUNGS, LMLadderConfig

WALL = ("time", "tokens_per_s", "update_time", "forward_time", "train_time", "generate_time", "score_time", "comm_time")


def run_lm_ladder(cfg: LMLadderConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    from ..run.checkpoint import write_json_atomic
    from ..run.progress import clock
    from ..run.rundir import check_ladder_out, holds_run, prepare_out
    from ..run.signals import RunInterrupted
    from .ppo_trainer import train

    cfg.validate()
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)  # --seed is the first
    jobs = [(a, s, cfg.run_config(a, s)) for a in cfg.algos for s in seeds]  # every config first
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file, not a directory", "give proxrl ladder --lm a directory for --out")
    if not cfg.overwrite:
        for _, _, rc in jobs:
            if holds_run(rc.out):
                raise ConfigError("out", f"{cfg.out} already holds ladder runs (e.g. {rc.out})",
                                  "replace them with --overwrite or choose another --out")
    check_ladder_out(out, "proxrl ladder --lm")
    prepare_out(out, overwrite=False, field="out", command="proxrl ladder --lm")
    for name in ("ladder.md", "ladder.json", "ladder.png"):  # an older ladder's summary never sits beside new runs
        (out / name).unlink(missing_ok=True)
    results, t0 = [], time.perf_counter()
    for i, (algo, seed, rc) in enumerate(jobs):
        done = time.perf_counter() - t0
        eta = f", ETA {clock(done / i * (len(jobs) - i))}" if i else ""
        log(f"ladder: run {i + 1}/{len(jobs)}: {algo} seed {seed}{eta}")
        t = time.perf_counter()
        try:
            summary = train(rc, log=lambda s, a=algo, k=seed: log(f"  [{a} s{k}] {s}"))
        except RunInterrupted as e:  # its resume command continues this one run, not the ladder: said
            raise e.restate(f"{e}; the ladder stopped at run {i + 1}/{len(jobs)} ({algo} seed {seed}) and wrote no "
                            f"ladder.md/json/png; its finished runs are kept in {out}, but the ladder has no "
                            "--resume (run it again with --overwrite)") from None
        rows = [json.loads(line) for line in open(Path(rc.out) / "metrics.jsonl") if line.strip()]
        results.append({"algo": algo, "seed": seed, "run_dir": rc.out, "wall_time": time.perf_counter() - t,
                        "reward_before": summary["reward_before"], "reward_after": summary["reward_after"],
                        "kl_ref_after": summary["kl_ref"], "metrics": rows})
    total = time.perf_counter() - t0
    table = summarise(results, cfg.algos)
    (out / "ladder.md").write_text(markdown(cfg, table, total))
    write_json_atomic(out / "ladder.json", {"config": {**cfg.__dict__, "algos": list(cfg.algos)}, "wall_time": total,
                                            "rungs": table, "runs": [{k: v for k, v in r.items() if k != "metrics"}
                                                                     for r in results]})
    draw(out / "ladder.png", results, table, cfg)
    return out


def _real(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _values(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if _real(r.get(key))]


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _window(n: int) -> int:
    """Updates averaged for "first" and for "last": 3, or as many as keep the two apart (n // 2: none for a
    one-update run, whose first and last would be the same update)."""
    return min(3, n // 2)


def summarise(results: list[dict], algos) -> list[dict]:
    """One row per rung, over its seeds: training reward of the first and last 3 updates (fewer when the run has
    fewer than 6, so that the two never share an update), held-out reward
    before/after, KL to the reference after, the largest importance-weight variance, the medians of the wall
    time per update and per 1,000 generated tokens."""
    table = []
    for a in algos:
        rs = [r for r in results if r["algo"] == a]
        w = [_window(len(r["metrics"])) for r in rs]  # never overlapping: with ≤ 5 updates the halves, or fewer
        firsts = [_mean(_values(r["metrics"][:k], "reward_mean")) for r, k in zip(rs, w)]
        lasts = [_mean(_values(r["metrics"][len(r["metrics"]) - k:], "reward_mean")) for r, k in zip(rs, w)]
        parts = ("generate_time", "score_time", "update_time")
        per_update = [sum(m[k] for k in parts) for r in rs for m in r["metrics"] if all(_real(m.get(k)) for k in parts)]
        per_ktok = [1000 / m["tokens_per_s"] for r in rs for m in r["metrics"] if (m.get("tokens_per_s") or 0) > 0]
        isvar = [v for r in rs for v in _values(r["metrics"], "is_weight_var") + _values(r["metrics"], "behaviour_weight_var")]
        table.append({
            "algo": a, "summary": LM_RUNGS[a].summary, "seeds": len(rs),
            "train_reward_first": _mean([x for x in firsts if x is not None]),
            "train_reward_last": _mean([x for x in lasts if x is not None]),
            "heldout_before": _mean(_values(rs, "reward_before")), "heldout_after": _mean(_values(rs, "reward_after")),
            "heldout_after_per_seed": [r["reward_after"] for r in rs],
            "kl_ref_after": _mean(_values(rs, "kl_ref_after")),
            "max_is_weight_var": max(isvar) if isvar else None,
            "s_per_update": median(per_update) if per_update else None,
            "s_per_1k_tokens": median(per_ktok) if per_ktok else None,
            "wall_time_per_run": _mean([r["wall_time"] for r in rs]),
        })
    return table


def markdown(cfg: LMLadderConfig, table: list[dict], total: float) -> str:
    f = lambda x, fmt: "–" if x is None else format(x, fmt)  # noqa: E731
    lines = [f"# proxrl ladder on tokens: {Path(cfg.policy).name or cfg.policy}", "",
             f"Reward `{cfg.reward}`, prompts `{cfg.prompts}`; {cfg.seeds} seed(s) × {cfg.updates} updates × "
             f"{cfg.batch_size} responses of ≤ {cfg.response_length} tokens per rung, lr {cfg.lr:g}, β {cfg.kl_coef:g}, "
             f"{cfg.finetune}. Held-out: {cfg.eval_prompts} prompts, one sample each, before and after. Training "
             f"reward: mean of the first / last 3 updates (of ⌊n/2⌋ when n < 6). Costs: medians over all updates. Total wall time "
             f"{total:.0f} s.", "",
             "| rung | training reward first → last | held-out before → after | KL to ref after (nats/seq) "
             "| max importance-weight variance | s / update | s / 1k tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| `{r['algo']}` | {f(r['train_reward_first'], '+.4f')} → {f(r['train_reward_last'], '+.4f')} | "
                     f"{f(r['heldout_before'], '+.4f')} → {f(r['heldout_after'], '+.4f')} | {f(r['kl_ref_after'], '.3f')} | "
                     f"{f(r['max_is_weight_var'], '.3g')} | {f(r['s_per_update'], '.2f')} | {f(r['s_per_1k_tokens'], '.2f')} |")
    lines += ["", "What each rung changes:", ""] + [f"- `{r['algo']}`: {r['summary']}" for r in table]
    return "\n".join(lines) + "\n"


def draw(path: Path, results: list[dict], table: list[dict], cfg: LMLadderConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..run.plot import band, curve

    grid = np.arange(1, cfg.updates + 1, dtype=float)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    panels = [("reward_mean", "training reward per update (median, min–max over seeds)", False),
              ("kl_ref", "KL to the reference (k1, nats / sequence)", False),
              ("is_weight_var", "importance-weight variance (is-pg)", True)]
    colors = plt.get_cmap("tab10")
    for ax, (metric, title, logy) in zip(axes, panels):
        drawn = False
        for i, a in enumerate(cfg.algos):
            b = band([curve(r["metrics"], metric) for r in results if r["algo"] == a], grid)
            if b is None:
                continue
            med, lo, hi = b
            ax.plot(grid, med, color=colors(i % 10), label=a, lw=1.5)
            ax.fill_between(grid, lo, hi, color=colors(i % 10), alpha=0.15)
            drawn = True
        if logy and drawn:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="update")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    x = np.arange(len(table))
    axes[3].bar(x - 0.2, [r["s_per_update"] or 0 for r in table], 0.4, label="s / update")
    axes[3].bar(x + 0.2, [r["s_per_1k_tokens"] or 0 for r in table], 0.4, label="s / 1k tokens")
    axes[3].set_xticks(x, [r["algo"] for r in table], rotation=45, ha="right", fontsize=8)
    axes[3].set_title("wall time (median)", fontsize=10)
    axes[3].legend(fontsize=8)
    axes[3].grid(alpha=0.3, axis="y")
    fig.suptitle(f"proxrl ladder on tokens — {cfg.seeds} seed(s), {cfg.updates} updates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
