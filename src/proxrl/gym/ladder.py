"""``proxrl ladder``: every rung × seed on one task, and the comparison that shows why each rung exists.

The table (``ladder.md``) and figure (``ladder.png``) put side by side: the seed-to-seed spread of
vanilla PG, the importance-weight variance of the unconstrained off-policy rung (is-pg), and the KL
that PPO and TRPO keep. Runs go to ``<out>/<rung>/seed<k>/`` and are ordinary run directories.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError
from ..rungs import LADDER, RUNGS


@dataclass
class LadderConfig:
    env: str = "CartPole-v1"
    """Gymnasium environment id."""
    seeds: int = 3
    """Seeds per rung (1, 2, …, seeds)."""
    steps: int = 50_000
    """Environment steps per run (the same budget for every rung, so the comparison is fair)."""
    out: str = "ladder"
    """Output directory."""
    algos: tuple[str, ...] = tuple(LADDER)
    """Rungs to run, in ladder order."""
    workers: int = 0
    """Parallel runs (0: one per CPU core, at most 4)."""
    eval_episodes: int = 10
    """Episodes of the final deterministic evaluation of each run."""
    overwrite: bool = False
    """Replace the runs of an earlier ladder in --out (without it such an --out is refused)."""


def _one(env: str, algo: str, seed: int, steps: int, out: str, eval_episodes: int, overwrite: bool = False) -> dict:
    from ..errors import ProxrlError
    from .trainer import evaluate, train

    t0 = time.perf_counter()
    try:
        res = train(env=env, algo=algo, seed=seed, steps=steps, out=out, progress="off", overwrite=overwrite)
        wall = time.perf_counter() - t0
        ev = evaluate(out, episodes=eval_episodes, seed=10_000 + seed)
    except ProxrlError as e:  # returned as text: the errors' constructors do not survive pickling to the parent
        return {"algo": algo, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    return {"algo": algo, "seed": seed, "run_dir": out, "wall_time": wall, "eval_return": ev["mean_return"],
            "metrics": res.metrics}


def _check(cfg: LadderConfig, jobs: list[tuple]) -> None:
    """Everything a worker would refuse, refused here before any run starts: each rung's resolved config
    (e.g. --steps below one rollout batch of its preset) and run directories already holding runs."""
    from .config import resolve
    from ..run.rundir import holds_run

    for name in ("seeds", "steps", "workers", "eval_episodes"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "workers" else 1):
            raise ConfigError(name, f"must be a {'non-negative' if name == 'workers' else 'positive'} integer, got {v!r}")
    if not cfg.algos:
        raise ConfigError("algos", "no rungs given", f"choose from {', '.join(RUNGS)}")
    twice = sorted({a for a in cfg.algos if list(cfg.algos).count(a) > 1})
    if twice:  # two jobs would share one run directory
        raise ConfigError("algos", f"rung {twice[0]} is given twice", "give each rung once")
    batches = {}
    for a in cfg.algos:
        try:
            batches[a] = resolve({"env": cfg.env, "algo": a, "seed": 1})[0].batch_size
        except ConfigError as e:
            raise ConfigError(e.field, f"rung {a}: {str(e)[len(e.field) + 2:]}") from None
    need = max(batches.values())
    for a, batch in batches.items():
        if cfg.steps < batch:
            raise ConfigError("steps", f"{cfg.steps} is less than one rollout batch of rung {a} ({batch} = "
                              "num_envs × num_steps of its preset)", f"give --steps {need} or more")
    for a in cfg.algos:
        try:
            resolve({"env": cfg.env, "algo": a, "seed": 1, "steps": cfg.steps})
        except ConfigError as e:
            problem = str(e)[len(e.field) + 2:]
            raise ConfigError(e.field, f"rung {a}: {problem}") from None
    from .envs import make_vec_env

    make_vec_env(cfg.env, 1).close()  # an env proxrl cannot train on (Discrete observations) refused here, not by 21 runs
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file, not a directory", "give proxrl ladder a directory for --out")
    for job in jobs:
        if Path(job[4]).exists() and not Path(job[4]).is_dir():
            raise ConfigError("out", f"{job[4]} is a file, not a run directory", "remove it or choose another --out")
    if not cfg.overwrite:
        for job in jobs:
            if holds_run(job[4]):
                raise ConfigError("out", f"{cfg.out} already holds ladder runs (e.g. {job[4]})",
                                  "replace them with --overwrite or choose another --out")


def _cost(env: str, algo: str, steps: int) -> float:
    """A run's relative cost, for ordering only (results never depend on it): env steps per env (one policy
    forward per vector step) plus optimizer steps and Fisher-vector products, each worth ~6 vector steps."""
    from .config import resolve

    c = resolve({"env": env, "algo": algo, "seed": 1, "steps": steps})[0]
    rung = RUNGS[algo]
    updates = steps / (c.num_envs * c.num_steps)
    critic = c.critic_epochs * c.critic_minibatches if rung.critic else 0
    if rung.update == "trust-region":
        per_update = critic + 2 * c.cg_iters
    elif rung.surrogate == "vanilla":
        per_update = c.update_epochs * c.num_minibatches + critic
    else:  # the critic trains in the same steps
        per_update = c.update_epochs * c.num_minibatches
    return steps / c.num_envs + 6 * updates * per_update


def _steps_to(metrics: list[dict], threshold: Optional[float], window: int = 3) -> Optional[int]:
    """First env step at which the mean of the last ``window`` logged training returns reaches the threshold."""
    if threshold is None:
        return None
    rets, steps = [], []
    for m in metrics:
        if m["episode_return"] is not None:
            rets.append(m["episode_return"])
            steps.append(m["step"])
            if len(rets) >= window and np.mean(rets[-window:]) >= threshold:
                return steps[-1]
    return None


def run_ladder(cfg: LadderConfig) -> Path:
    import gymnasium as gym

    for a in cfg.algos:
        if a not in RUNGS:
            raise ConfigError("algos", f"unknown rung {a!r}", f"choose from {', '.join(RUNGS)}")
    if cfg.seeds <= 0:
        raise ConfigError("seeds", f"must be a positive integer, got {cfg.seeds}")
    if cfg.steps <= 0:
        raise ConfigError("steps", f"must be a positive integer, got {cfg.steps}")
    if cfg.env not in gym.registry:
        raise ConfigError("env", f"unknown Gymnasium environment id {cfg.env!r}")
    threshold = gym.spec(cfg.env).reward_threshold
    out = Path(cfg.out)
    jobs = [(cfg.env, a, s, cfg.steps, str(out / a / f"seed{s}"), cfg.eval_episodes, cfg.overwrite)
            for a in cfg.algos for s in range(1, cfg.seeds + 1)]
    _check(cfg, jobs)
    from ..run.rundir import check_ladder_out, prepare_out

    check_ladder_out(out, "proxrl ladder")
    prepare_out(out, overwrite=False, field="out", command="proxrl ladder")  # writable; its runs checked above
    for name in ("ladder.md", "ladder.json", "ladder.png"):  # an older ladder's summary never sits beside new runs
        (out / name).unlink(missing_ok=True)
    workers = cfg.workers or min(4, os.cpu_count() or 1)
    t0 = time.perf_counter()
    if workers == 1:
        results = [_one(*j) for j in jobs]
    else:  # the costliest runs first, so that no worker is left alone with a long run at the end
        order = sorted(range(len(jobs)), key=lambda i: -_cost(cfg.env, jobs[i][1], cfg.steps))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            done = list(pool.map(_one, *zip(*[jobs[i] for i in order])))
        results = [r for _, r in sorted(zip(order, done), key=lambda p: p[0])]  # back in ladder order
    failed = [r for r in results if "error" in r]
    if failed:
        from ..errors import ProxrlError

        raise ProxrlError(f"rung {failed[0]['algo']} seed {failed[0]['seed']}: {failed[0]['error']}"
                          + (f" (and {len(failed) - 1} more runs failed)" if len(failed) > 1 else "")
                          + f"; {len(results) - len(failed)} of {len(results)} runs finished, their directories kept")
    total = time.perf_counter() - t0
    rows = summarise(results, cfg.algos, threshold)
    write_markdown(out / "ladder.md", cfg, rows, threshold, total)
    from ..run.checkpoint import write_json_atomic

    write_json_atomic(out / "ladder.json", {"config": cfg.__dict__ | {"algos": list(cfg.algos)}, "threshold": threshold,
                                            "wall_time": total, "rungs": rows})
    draw(out / "ladder.png", results, cfg, threshold)
    return out


def summarise(results: list[dict], algos, threshold) -> list[dict]:
    rows = []
    for a in algos:
        rs = [r for r in results if r["algo"] == a]
        evals = np.array([r["eval_return"] for r in rs])
        to_thr = [_steps_to(r["metrics"], threshold) for r in rs]
        reached = [s for s in to_thr if s is not None]
        isvar = [m["is_weight_var"] for r in rs for m in r["metrics"] if m["is_weight_var"] is not None]
        kls = [m["approx_kl"] for r in rs for m in r["metrics"] if m["approx_kl"] is not None]
        rows.append({
            "algo": a, "summary": RUNGS[a].summary,
            "eval_mean": float(evals.mean()), "eval_std": float(evals.std()),
            "eval_per_seed": evals.tolist(),
            "seeds_reaching_threshold": len(reached), "seeds": len(rs),
            "median_steps_to_threshold": float(np.median(reached)) if reached else None,
            "wall_time_mean": float(np.mean([r["wall_time"] for r in rs])),
            "max_is_weight_var": float(max(isvar)) if isvar else None,
            "mean_approx_kl": float(np.mean(kls)) if kls else None,
        })
    return rows


def write_markdown(path: Path, cfg: LadderConfig, rows: list[dict], threshold, total: float) -> None:
    f = lambda x, fmt: "–" if x is None else format(x, fmt)
    lines = [f"# proxrl ladder on {cfg.env}", "",
             f"{cfg.seeds} seeds × {cfg.steps} env steps per rung; final return = deterministic evaluation over "
             f"{cfg.eval_episodes} episodes; threshold = {threshold} (Gymnasium's reward_threshold), reached when "
             f"the mean of 3 consecutive logged training returns passes it. Total wall time {total:.0f} s.", "",
             "| rung | final return (mean ± std over seeds) | seeds reaching threshold | median steps to threshold "
             "| wall time / run (s) | max importance-weight variance | mean approx KL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['algo']}` | {r['eval_mean']:.1f} ± {r['eval_std']:.1f} | {r['seeds_reaching_threshold']}/"
                     f"{r['seeds']} | {f(r['median_steps_to_threshold'], '.0f')} | {r['wall_time_mean']:.1f} | "
                     f"{f(r['max_is_weight_var'], '.3g')} | {f(r['mean_approx_kl'], '.4f')} |")
    lines += ["", "What each rung changes:", ""] + [f"- `{r['algo']}`: {r['summary']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def draw(path: Path, results: list[dict], cfg: LadderConfig, threshold) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..run.plot import band, curve

    grid = np.linspace(0, cfg.steps, 100)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("episode_return", "episode return (median, min–max over seeds)", False),
              ("is_weight_var", "importance-weight variance after the update", True),
              ("approx_kl", "KL(π_old‖π) per update (k3)", True)]
    colors = plt.get_cmap("tab10")
    for ax, (metric, title, logy) in zip(axes, panels):
        for i, a in enumerate(cfg.algos):
            b = band([curve(r["metrics"], metric) for r in results if r["algo"] == a], grid)
            if b is None:
                continue
            med, lo, hi = b
            ax.plot(grid, med, color=colors(i), label=a, lw=1.5)
            ax.fill_between(grid, lo, hi, color=colors(i), alpha=0.15)
        if metric == "episode_return" and threshold is not None:
            ax.axhline(threshold, color="k", ls=":", lw=1)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"proxrl ladder — {cfg.env}, {cfg.seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
