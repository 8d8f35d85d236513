"""TRL side of benchmarks/rlhf_vs_trl.py: time PPO updates of ``trl.experimental.ppo.PPOTrainer``.

Runs in TRL's own venv (benchmarks/setup_trl.sh), never imports proxrl. argv[1] is the JSON task written by
the driver; the last stdout line is the JSON result. Settings mirror the proxrl side:

* policy, reference, value model and reward model all come from the same tiny GPT-2 directory (value and
  reward models = ``AutoModelForSequenceClassification(num_labels=1)``: the trunk + a fresh scalar head);
* rollout batch ``batch_size`` (``per_device_train_batch_size=batch_size, gradient_accumulation_steps=1``),
  ``num_mini_batches`` minibatches per epoch, one optimizer step each (TRL runs a minibatch as one
  micro-batch when ``per_device_train_batch_size`` ≥ the minibatch), ``num_ppo_epochs`` epochs;
* float32 (``bf16=False``; TRL's config defaults to bf16), CPU, stop at EOS, missing-EOS penalty 1.0,
  fixed KL coefficient, TRL's default chunk for generation and rollout forwards (64 ≥ the batch: one chunk).

An update is timed from the end of the previous one (or the start of training) to TRL's ``on_step_end``:
data loading, generation, reference/value/reward forwards, advantages, the PPO epochs and TRL's logging.
Generation alone is timed by wrapping TRL's module-level ``batch_generation``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time


def rlhf_update(task: dict) -> dict:
    import torch

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    path, B = task["policy"], task["batch_size"]
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    torch.manual_seed(task["seed"])
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    torch.manual_seed(task["seed"] + 1)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    reward.requires_grad_(False)
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in task["prompts"]]})

    gen_times: list[float] = []
    original = ppo_module.batch_generation

    def timed_generation(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return out

    ppo_module.batch_generation = timed_generation

    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                        num_mini_batches=task["num_minibatches"], num_ppo_epochs=task["epochs"],
                        response_length=task["response_length"], temperature=task["temperature"],
                        learning_rate=task["lr"], kl_coef=task["kl_coef"], stop_token="eos", missing_eos_penalty=1.0,
                        total_episodes=B * task["updates"], num_sample_generations=0, report_to="none",
                        save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=task["seed"],
                        disable_tqdm=True, logging_strategy="no")
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=ds, value_model=value, callbacks=[Clock()])
        trainer.train()
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    if len(times) != task["updates"]:
        raise RuntimeError(f"expected {task['updates']} timed updates, got {len(times)}")
    import accelerate

    return {"update_times": times, "generation_times": gen_times, "cpu_times": cpu,
            "median_update_excl_first": statistics.median(times[1:] or times), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "accelerate": accelerate.__version__}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    print(json.dumps({"rlhf_update": rlhf_update}[task["kind"]](task)))
