"""Critic-free rungs vs TRL: wall time per update of proxrl's ``grpo`` and ``rloo`` rungs against TRL's
``GRPOTrainer`` and ``RLOOTrainer`` on CPU, the same tiny model, repetitions interleaved in one run.

    python -m venv ../trl-venv && ../trl-venv/bin/pip install torch==2.13.0 && ../trl-venv/bin/pip install trl
    python benchmarks/trl_compare.py --trl-python ../trl-venv/bin/python                              # 3 repetitions × 6 updates, both algorithms
    python benchmarks/trl_compare.py --reps 1 --updates 2 --no-peer   # proxrl alone (smoke test)

This one file is the driver and both workers: the driver (run with proxrl's python) starts, for every
repetition, algorithm and side, a fresh process — ``--worker proxrl`` in proxrl's venv, ``--worker trl`` in
TRL's venv (which never imports proxrl; proxrl's venv never imports TRL) — and reads the per-update wall
times it prints as its last stdout line (JSON).

The same work on both sides, per update (defaults): 4 prompts × K = 4 samples = 16 completions of at most
16 new tokens (stop at EOS) at temperature 1.0 from the same tiny random Llama (2 layers, hidden 64, byte
tokenizer, ``proxrl.lm.tiny.make_tiny``), full fine-tuning in float32, a Python reward (share of lowercase
letters in the completion), the frozen reference's log-probs with β = 0.05 (fixed), Adam(W) lr 1e-5, gradient
clip 1.0, and the rung's optimizer steps: proxrl's ``update_epochs × num_minibatches`` from ``LM_RUNGS``
(grpo 2 × 2 = 4 steps on minibatches of 8; rloo 1 × 1 = 1 step on all 16) ↔ TRL's ``num_iterations`` ×
``steps_per_generation`` with ``per_device_train_batch_size`` = the minibatch and no gradient accumulation.

Time of an update: proxrl — the difference of consecutive ``time`` values in metrics.jsonl (end of one
update to the end of the next: prompt draw, generation, scoring, the no-grad forwards, the optimizer steps,
the metrics line); TRL — from one update's last ``on_step_end`` to the next one's (data loading,
generation, scoring, the no-grad forwards, the optimizer steps, the Trainer's bookkeeping). The first update
of each process is warm-up and dropped. Results: benchmarks/results/trl_compare.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_TRL_PYTHON = os.environ.get("TRL_PYTHON", str(Path(__file__).resolve().parents[2] / "trl-venv" / "bin" / "python"))
DEFAULT_MODEL = str(Path(tempfile.gettempdir()) / "proxrl-bench-tiny")
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rain and summer "
         "light on the old stone bridge near the river").split()


def make_prompts(n: int) -> list[str]:
    """``n`` fixed plain-text prompts (no chat template on either side)."""
    return [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 4)) + ":" for i in range(n)]


def lowercase_share(text: str) -> float:
    """The reward: share of lowercase ASCII letters in the completion (0 for an empty one)."""
    return sum("a" <= c <= "z" for c in text) / len(text) if text else 0.0


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# --------------------------------------------------------------------------- worker: proxrl
def proxrl_worker(task: dict) -> dict:
    set_threads(task["threads"])
    import torch

    import proxrl
    import transformers
    from proxrl.lm.config import RLConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.ppo_trainer import train

    K, P = task["k"], task["prompts_per_update"]
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "prompts.jsonl", [{"prompt": p} for p in task["prompts"]])
        cfg = RLConfig(algo=task["algo"], policy=task["model"], reward="unused:fn",
                       prompts=str(Path(tmp) / "prompts.jsonl"), out=str(Path(tmp) / "run"), finetune="full",
                       updates=task["updates"], batch_size=P * K, samples_per_prompt=K,
                       micro_batch_size=task["minibatch"], response_length=task["response_length"],
                       temperature=task["temperature"], lr=task["lr"], max_grad_norm=1.0,
                       kl_coef=task["beta"], adaptive_kl=False, missing_eos_penalty=None,
                       eval_prompts=0, samples_per_update=0, checkpoint_every=0, seed=task["seed"])
        # the rung's own epochs × minibatches (left at None above, resolved from LM_RUNGS)
        assert (cfg.update_epochs, cfg.num_minibatches) == (task["epochs"], task["num_minibatches"]), \
            (cfg.update_epochs, cfg.num_minibatches)

        def reward(prompts, responses):
            return [lowercase_share(r) for r in responses]

        train(cfg, reward=reward, log=lambda *_: None)
        rows = [json.loads(line) for line in open(Path(tmp) / "run" / "metrics.jsonl")]
    ends = [r["time"] for r in rows]
    starts = [0.0] + ends[:-1]
    return {
        "side": "proxrl", "algo": task["algo"], "seed": task["seed"],
        "update_times": [e - s for s, e in zip(starts, ends)],
        "generate_times": [r["generate_time"] for r in rows],
        "in_update_times": [r["generate_time"] + r["score_time"] + r["update_time"] for r in rows],
        "completions_per_update": P * K,
        "optimizer_steps_per_update": cfg.update_epochs * cfg.num_minibatches,
        "mean_completion_length": statistics.mean(r["response_length"] for r in rows),
        "threads_at_end": torch.get_num_threads(),
        "versions": {"proxrl": getattr(proxrl, "__version__", "?"), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


# --------------------------------------------------------------------------- worker: TRL
def trl_worker(task: dict) -> dict:
    set_threads(task["threads"])
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    algo, K, P = task["algo"], task["k"], task["prompts_per_update"]
    steps_per_update = task["epochs"] * task["num_minibatches"]
    if algo == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    def reward(prompts, completions, **kw):
        return [lowercase_share(c) for c in completions]

    with tempfile.TemporaryDirectory() as out:
        args = Config(
            output_dir=out, seed=task["seed"], use_cpu=True, bf16=False, fp16=False,
            model_init_kwargs={"dtype": "float32"}, gradient_checkpointing=False,
            per_device_train_batch_size=task["minibatch"], gradient_accumulation_steps=1,
            steps_per_generation=task["num_minibatches"], num_iterations=task["epochs"],
            num_generations=K, max_completion_length=task["response_length"], temperature=task["temperature"],
            top_p=1.0, top_k=0, learning_rate=task["lr"], lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=1.0, beta=task["beta"], max_steps=task["updates"] * steps_per_update,
            use_vllm=False, report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
            disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
        assert args.generation_batch_size == P * K, args.generation_batch_size
        trainer = Trainer(model=task["model"], reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": task["prompts"]}), callbacks=[Clock()])
        gen: list[tuple[float, int, float]] = []  # (seconds, completions, mean length) per generation call
        original = trainer._generate_single_turn

        def timed_generation(*a, **k):
            t0 = time.perf_counter()
            result = original(*a, **k)  # GRPO: (completion_ids, logprobs); RLOO: completion_ids
            completion_ids = result[0] if isinstance(result, tuple) else result
            gen.append((time.perf_counter() - t0, len(completion_ids),
                        statistics.mean(len(c) for c in completion_ids)))
            return result

        trainer._generate_single_turn = timed_generation
        trainer.train()
        steps = trainer.state.global_step
    ends = marks[::steps_per_update]  # train begin, then the end of each update's last optimizer step
    assert steps == task["updates"] * steps_per_update and len(gen) == task["updates"], (steps, len(gen))
    return {
        "side": "trl", "algo": algo, "seed": task["seed"],
        "update_times": [b - a for a, b in zip(ends, ends[1:])],
        "generate_times": [g[0] for g in gen],
        "completions_per_update": gen[0][1],
        "optimizer_steps_per_update": steps // task["updates"],
        "mean_completion_length": statistics.mean(g[2] for g in gen),
        "threads_at_end": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "optim": str(args.optim), "loss_type": getattr(args, "loss_type", None),
    }


# --------------------------------------------------------------------------- driver
def run_worker(python: str, side: str, task: dict, timeout: float = 1800) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(task["threads"]), MKL_NUM_THREADS=str(task["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", side, json.dumps(task)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--updates", type=int, default=6, help="updates per process (the first is warm-up)")
    ap.add_argument("--algos", nargs="+", default=["grpo", "rloo"], choices=["grpo", "rloo"])
    ap.add_argument("--prompts-per-update", type=int, default=4)
    ap.add_argument("--k", type=int, default=4, help="completions per prompt")
    ap.add_argument("--response-length", type=int, default=16, help="max new tokens")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.05, help="KL-to-reference coefficient, both sides (fixed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="tiny model directory (built with make_tiny if missing)")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    ap.add_argument("--no-peer", action="store_true", help="proxrl only")
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", choices=["proxrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("task", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        task = json.loads(args.task)
        print(json.dumps((proxrl_worker if args.worker == "proxrl" else trl_worker)(task)), flush=True)
        return 0

    from proxrl.lm.config import LM_RUNGS

    if not (Path(args.model) / "config.json").exists():
        from proxrl.lm.tiny import make_tiny

        make_tiny(args.model, arch="llama", layers=2, hidden=64)
    sides = [("proxrl", sys.executable)] + ([] if args.no_peer else [("trl", args.trl_python)])
    n_prompts = max(32, args.prompts_per_update * args.updates)
    base = dict(model=str(Path(args.model).resolve()), prompts=make_prompts(n_prompts), updates=args.updates,
                prompts_per_update=args.prompts_per_update, k=args.k, response_length=args.response_length,
                temperature=args.temperature, lr=args.lr, beta=args.beta, threads=args.threads)
    tasks = {}
    for algo in args.algos:
        d = LM_RUNGS[algo].defaults
        epochs, n_mb = d.get("update_epochs", 2), d.get("num_minibatches", 2)
        batch = args.prompts_per_update * args.k
        assert batch % n_mb == 0
        tasks[algo] = dict(base, algo=algo, epochs=epochs, num_minibatches=n_mb, minibatch=batch // n_mb)
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    runs: list[dict] = []
    t_all = time.perf_counter()
    for rep in range(1, args.reps + 1):
        for algo in args.algos:
            order = sides if rep % 2 else sides[::-1]  # interleaved; who goes first alternates
            for side, py in order:
                r = run_worker(py, side, dict(tasks[algo], seed=rep))
                r["rep"] = rep
                runs.append(r)
                kept = r["update_times"][1:]
                print(f"rep {rep} {algo:4s} {side:6s} median {med(kept):.3f}s  updates: "
                      + " ".join(f"{t:.3f}" for t in r["update_times"]) + f"  (load {os.getloadavg()[0]:.2f})",
                      flush=True)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t_all

    summary = {}
    for algo in args.algos:
        s = {}
        for side, _ in sides:
            rs = [r for r in runs if r["algo"] == algo and r["side"] == side]
            s[side] = {"median_update_s": med([t for r in rs for t in r["update_times"][1:]]),
                       "per_rep_median_s": [med(r["update_times"][1:]) for r in rs],
                       "median_generate_s": med([t for r in rs for t in r["generate_times"][1:]]),
                       "mean_completion_length": statistics.mean(r["mean_completion_length"] for r in rs),
                       "completions_per_update": rs[0]["completions_per_update"],
                       "optimizer_steps_per_update": rs[0]["optimizer_steps_per_update"],
                       "threads_at_end": sorted({r["threads_at_end"] for r in rs}),
                       "versions": rs[0]["versions"]}
            if side == "trl":
                s[side]["optim"], s[side]["loss_type"] = rs[0].get("optim"), rs[0].get("loss_type")
        if "trl" in s:
            s["ratio_proxrl_over_trl"] = s["proxrl"]["median_update_s"] / s["trl"]["median_update_s"]
            s["per_rep_ratio"] = [a / b for a, b in zip(s["proxrl"]["per_rep_median_s"], s["trl"]["per_rep_median_s"])]
            s["ratio_generate"] = s["proxrl"]["median_generate_s"] / s["trl"]["median_generate_s"]
        summary[algo] = s
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "trl_compare" + (f"-{args.tag}" if args.tag else "")
    settings = {k: v for k, v in base.items() if k != "prompts"} | {"n_prompts": n_prompts, "reps": args.reps,
                                                                   "tasks": {a: {k: tasks[a][k] for k in ("epochs", "num_minibatches", "minibatch")} for a in tasks}}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "settings": settings, "summary": summary,
                                                      "runs": runs}, indent=1))
    (RESULTS / f"{stem}.md").write_text(report(info, settings, summary, runs, args))
    print(json.dumps({a: {k: v for k, v in s.items() if "ratio" in k} for a, s in summary.items()}, indent=1))
    return 0


def report(info, settings, summary, runs, args) -> str:
    vp = next((r["versions"] for r in runs if r["side"] == "proxrl"), {})
    vt = next((r["versions"] for r in runs if r["side"] == "trl"), {})
    L = ["# proxrl `grpo` / `rloo` rungs vs TRL `GRPOTrainer` / `RLOOTrainer`: wall time per update (CPU)", "",
         f"Written by `benchmarks/trl_compare.py` on {info['date']}; {info.get('cpu', '?')}, {info['cores']} cores, "
         f"{args.threads} torch thread(s) on each side; load average {info['loadavg_start'][0]:.2f} at the start, "
         f"{info['loadavg_end'][0]:.2f} at the end; {info['wall_s'] / 60:.1f} min in all.", "",
         f"Versions: proxrl venv — torch {vp.get('torch')}, transformers {vp.get('transformers')}; "
         f"TRL venv — trl {vt.get('trl')}, torch {vt.get('torch')}, transformers {vt.get('transformers')}.", "",
         "## Result", "",
         "Median over all non-warm-up updates of all repetitions (the first update of each process dropped).", "",
         "| algorithm | proxrl s/update | TRL s/update | proxrl / TRL | target ≤ 0.5 | generation s, proxrl / TRL (ratio) |",
         "|---|---|---|---|---|---|"]
    for algo, s in summary.items():
        if "trl" not in s:
            L.append(f"| {algo} | {s['proxrl']['median_update_s']:.3f} | – | – | – | – |")
            continue
        r = s["ratio_proxrl_over_trl"]
        L.append(f"| {algo} | {s['proxrl']['median_update_s']:.3f} | {s['trl']['median_update_s']:.3f} | **{r:.2f}** | "
                 f"{'met' if r <= 0.5 else 'not met'} | {s['proxrl']['median_generate_s']:.3f} / "
                 f"{s['trl']['median_generate_s']:.3f} ({s['ratio_generate']:.2f}) |")
    L += ["", "Per repetition (median of that process's updates 2…N, seconds; ratio of the two):", "",
          "| algorithm | rep | proxrl | TRL | ratio |", "|---|---|---|---|---|"]
    for algo, s in summary.items():
        for i, p in enumerate(s["proxrl"]["per_rep_median_s"]):
            t = s["trl"]["per_rep_median_s"][i] if "trl" in s else float("nan")
            L.append(f"| {algo} | {i + 1} | {p:.3f} | {t:.3f} | {p / t:.2f} |")
    L += ["", "Every update (seconds, the first is warm-up):", ""]
    for r in runs:
        L.append(f"- rep {r['rep']} {r['algo']} {r['side']}: " + ", ".join(f"{t:.3f}" for t in r["update_times"]))
    L += ["", "Work done per update, as measured (not only as configured):", "",
          "| algorithm | side | completions | optimizer steps | mean completion tokens | torch threads at end |",
          "|---|---|---|---|---|---|"]
    for algo, s in summary.items():
        for side in ("proxrl", "trl"):
            if side in s:
                x = s[side]
                L.append(f"| {algo} | {side} | {x['completions_per_update']} | {x['optimizer_steps_per_update']} | "
                         f"{x['mean_completion_length']:.2f} | {x['threads_at_end']} |")
    st = settings
    L += ["", "## Settings", "",
          f"Common: tiny random Llama from `proxrl.lm.tiny.make_tiny(arch='llama', layers=2, hidden=64)` "
          f"(≈90k parameters, byte tokenizer, pad `<pad>` ≠ eos `</s>`), loaded by both sides from `{st['model']}`; "
          f"{st['n_prompts']} fixed plain-text prompts (no chat template), {st['prompts_per_update']} per update × "
          f"K = {st['k']} completions; at most {st['response_length']} new tokens, stop at EOS; temperature "
          f"{st['temperature']}, no top-k/top-p; reward = share of lowercase letters of the completion (Python); "
          f"full fine-tuning, float32, CPU; KL-to-reference coefficient {st['beta']} fixed (reference forward on "
          f"both sides); lr {st['lr']} constant; gradient clip 1.0; {st['updates']} updates per process, "
          f"{st['reps']} repetitions, the two sides interleaved (the first side alternates by repetition).", ""]
    for algo, t in st["tasks"].items():
        steps = t["epochs"] * t["num_minibatches"]
        trl_cls = "GRPO" if algo == "grpo" else "RLOO"
        L.append(f"- **{algo}**: proxrl `RLConfig(algo='{algo}', finetune='full', batch_size={st['prompts_per_update'] * st['k']}, "
                 f"samples_per_prompt={st['k']}, micro_batch_size={t['minibatch']}, response_length={st['response_length']}, "
                 f"temperature={st['temperature']}, lr={st['lr']}, kl_coef={st['beta']}, adaptive_kl=False, "
                 f"missing_eos_penalty=None, eval_prompts=0, samples_per_update=0, checkpoint_every=0)`, "
                 f"update_epochs={t['epochs']} × num_minibatches={t['num_minibatches']} from `LM_RUNGS` = {steps} "
                 f"optimizer step(s) on minibatches of {t['minibatch']}. TRL `{trl_cls}Config(per_device_train_batch_size="
                 f"{t['minibatch']}, gradient_accumulation_steps=1, steps_per_generation={t['num_minibatches']}, "
                 f"num_iterations={t['epochs']}, num_generations={st['k']}, max_completion_length={st['response_length']}, "
                 f"temperature={st['temperature']}, top_p=1.0, top_k=0, learning_rate={st['lr']}, "
                 f"lr_scheduler_type='constant', max_grad_norm=1.0, beta={st['beta']}, use_vllm=False, use_cpu=True, "
                 f"bf16=False, fp16=False, gradient_checkpointing=False, model_init_kwargs={{'dtype': 'float32'}}, "
                 f"report_to='none', logging_strategy='no', save_strategy='no', eval_strategy='no', disable_tqdm=True)` "
                 f"→ generation_batch_size {st['prompts_per_update'] * st['k']}, {steps} optimizer step(s) per generation; "
                 f"optimizer `{summary[algo].get('trl', {}).get('optim', '?')}`.")
    L += ["", "## What is timed", "",
          "- proxrl: differences of consecutive `time` values of metrics.jsonl (end of an update to the end of the "
          "next: prompt draw, generation, scoring, no-grad policy/reference forwards, the optimizer steps, writing "
          "the metrics line).",
          "- TRL: a `TrainerCallback` marks `on_train_begin` and every `on_step_end`; an update is the interval "
          "between the ends of its last optimizer step and the previous update's (data loading, generation, "
          "scoring, no-grad forwards, the optimizer steps, the Trainer's per-step bookkeeping). Generation is "
          "timed separately by wrapping the trainer's `_generate_single_turn` (proxrl: `generate_time`).", "",
          "## Caveats", "",
          "- The machine has 2 cores and other jobs were running on them during the run (load averages above); "
          "both sides ran interleaved under the same load, so the ratios are more trustworthy than the absolute "
          "seconds, but they still carry noise of the order of the per-repetition spread shown above.",
          "- The model is tiny (≈90k parameters), so the times measure per-update overhead (Python, generation "
          "loop, Trainer machinery) far more than FLOPs; the ratio at a realistic model size may differ.",
          "- Same work, different algorithms' details (no effect on compute worth counting): KL placement — proxrl's "
          "rungs put −β·k1 in the reward (both rungs); TRL's RLOO does too, TRL's GRPO adds β·k3 to the loss. "
          "Loss aggregation: proxrl token-mean, TRL GRPO `dapo` (tokens of the accumulated batch). proxrl's `rloo` "
          "(a single optimizer step) runs one extra no-grad forward after the step for its `approx_kl_after` "
          "diagnostic; both compute the entropy of the trained tokens; TRL's GRPO computes old log-probs with "
          "an extra no-grad forward here because num_iterations > 1 (its RLOO always does; proxrl always does). "
          "These are each library's own costs and are counted.",
          "- One torch thread per side by default: with 2 threads on 2 cores already loaded by other jobs the "
          "runs oversubscribe the cores and the times become dominated by scheduling (see a `-threads2` file "
          "if one was written next to this one).",
          "- Sampling differs in implementation (proxrl's own KV-cached sampler vs `transformers.generate`), not "
          "in the distribution (full softmax at the temperature, stop at EOS); completion lengths are in the "
          "work table above.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
