"""Typed configs of the RLHF stages: one dataclass per CLI command. Field docstrings are the ``--help``
(tyro); defaults live here and nowhere else. ``validate()`` turns bad values into one-line ConfigErrors.

Batch vocabulary (DETAILS LM-12), used by every stage:

* ``batch_size`` — the rollout batch: sequences generated (PPO) or examples read per optimizer step group;
* ``num_minibatches`` — the rollout batch is shuffled and cut into this many minibatches, one optimizer step each;
* ``micro_batch_size`` — a minibatch is run through the model this many sequences at a time, gradients
  accumulated (memory only: the result does not depend on it, tested 8×1 ≡ 1×8);
* ``update_epochs`` — passes over the rollout batch, a fresh shuffle each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

from ..errors import ConfigError, check, check_field_types


def check_finite_floats(cfg) -> None:
    """Every float field of an LM config is a finite number (``--lr nan``, ``--temperature inf`` and the
    like are refused by name before any work; None stays allowed where a field is Optional)."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f.name, f"must be a finite number, got {v}", f"pass a real value to --{f.name.replace('_', '-')}")


def absolute_path(spec: Optional[str], code: bool = False) -> Optional[str]:
    """``spec`` as an absolute path when it names an existing local file or directory (a hub name or a
    Python module is left as it is), so that ``config.json`` and checkpoints work from any directory.
    ``code``: a reward ``file.py:function`` or ``module:function`` — only the path part is resolved."""
    if not spec:
        return spec
    if code and ":" in spec and not Path(spec).exists():
        path, fn = spec.rsplit(":", 1)
        return f"{Path(path).resolve()}:{fn}" if path.endswith(".py") and Path(path).is_file() else spec
    if code:  # otherwise only a reward-model run directory is a path
        return str(Path(spec).resolve()) if Path(spec).is_dir() else spec
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


@dataclass
class ModelOptions:
    finetune: Literal["lora", "full", "layers"] = "lora"
    """what to train: LoRA adapters (peft; the reference is the base with the adapter disabled), all
    weights (the reference is a frozen copy), or only the last ``train_layers`` transformer blocks"""
    train_layers: int = 2
    """with --finetune layers: how many of the last transformer blocks to train"""
    lora_r: int = 8
    """LoRA rank"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)"""
    lora_target: str = "all-linear"
    """modules LoRA adapts: 'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)"""
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """storage dtype of the frozen weights (the reference, a frozen trunk under LoRA); trained weights, their
    Adam state and the value/reward heads are always float32 master copies (float64 with float64)"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """compute precision: 'bf16' runs the model forwards under torch.autocast in bfloat16 (the LM head,
    log-softmax, KL and value/reward heads stay float32); 'fp16' the same in float16 with a gradient scaler
    (the loss scaled before backward, a step whose gradients overflow skipped and logged, the scale lowered);
    'auto' = bf16 when dtype is bfloat16, else fp32"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in backward instead of keeping them (activation memory of
    about one block instead of all, for about one more forward per training step); the result is unchanged"""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """wrap each prompt as a user turn with the tokenizer's chat template ('auto': when it has one)"""
    max_prompt_length: int = 128
    """prompts longer than this many tokens keep their last tokens"""
    seed: int = 0
    """seed of torch sampling, shuffling and initialisation"""
    device: str = "cpu"
    """torch device of every model and tensor of the stage: cpu, cuda, cuda:N, mps, or auto (CUDA when available)"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """on several processes (torchrun): 'ddp' replicates the models on every rank; 'fsdp' shards the LM weights,
    their gradients and Adam state over the ranks (FSDP2 fully_shard per transformer block; gathered for
    generation and the no-grad forwards). The same run either way; on one process both are the plain run"""

    def validate_model(self) -> None:
        from ..run.device import resolve_device

        check_field_types(self)  # through the Python API nothing else checks a value's type (tyro does on the CLI)
        check_finite_floats(self)
        self.device = resolve_device(self.device)
        check(self.lora_alpha > 0, "lora_alpha", f"must be > 0 (scale = alpha / r), got {self.lora_alpha}")
        check(self.train_layers >= 1, "train_layers", f"must be ≥ 1, got {self.train_layers}")
        check(self.lora_r >= 1, "lora_r", f"must be ≥ 1, got {self.lora_r}")
        check(self.max_prompt_length >= 1, "max_prompt_length", f"must be ≥ 1, got {self.max_prompt_length}")
        check(not (self.precision == "fp32" and self.dtype == "bfloat16"), "precision",
              "fp32 compute with bfloat16 weights mixes dtypes in every layer", "use --precision bf16 or auto")
        check(not (self.precision == "fp16" and self.dtype != "float32"), "precision",
              f"fp16 compute needs float32 weights, got --dtype {self.dtype} (bf16 frozen weights would meet fp16 "
              "activations in every layer; float64 is for exactness checks)",
              "use --dtype float32 with --precision fp16, or --precision bf16")
        check(not (self.parallel == "fsdp" and self.precision == "fp16"), "parallel",
              "--parallel fsdp with --precision fp16: torch's gradient scaler cannot unscale FSDP2's sharded "
              "gradients beside the replicated heads' (mixed Tensor and DTensor)",
              "use --precision bf16 (no scaler), or --parallel ddp")

    @property
    def amp(self):
        """The autocast dtype of the model forwards (None: no autocast)."""
        import torch

        mode = self.precision if self.precision != "auto" else ("bf16" if self.dtype == "bfloat16" else "fp32")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)

    def to_dict(self) -> dict:
        return asdict(self)


def restarted_by_torchrun() -> bool:
    """A worker restarted by torchrun (``--max-restarts``): the run in ``out`` is its own first attempt's."""
    import os

    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def check_new_out(out: str, overwrite: bool, stage: str, cfg=None, command: Optional[str] = None) -> bool:
    """The ``out`` of a new run of an LM stage (sft, rm, ppo): refused with one line when it is a file or holds a
    run (unless ``overwrite``), before any work; the directory is made later (``prepare_out``). Returns the
    overwrite flag to make it with (True also for a worker restarted by torchrun, which starts again over its
    first attempt's run — the run in ``out`` whose config.json holds ``cfg``, the config given; not over a run
    another command left there, which the first attempt refused)."""
    import json

    from ..errors import CheckpointError
    from ..run.rundir import check_out, holds_run
    from .loading import read_run_config

    if not overwrite and restarted_by_torchrun():
        try:
            run = read_run_config(out)
        except CheckpointError:  # config.json edited: not this command's
            run = None
        overwrite = run is not None and run["stage"] == stage and \
            run["config"] == json.loads(json.dumps(asdict(cfg) if cfg is not None else None))
    if holds_run(out) and not overwrite:
        raise ConfigError("out", f"{out} already holds a run", "replace it with --overwrite, or choose another --out")
    check_out(out, overwrite=overwrite, command=command or f"proxrl rlhf {stage}")
    return overwrite


@dataclass
class StageCheckpointOptions:
    """The checkpoint and resume options SFT and the reward model share (:mod:`proxrl.run.resumable`)."""
    checkpoint_every: int = 100
    """write a checkpoint (trained weights, optimizer, data order, RNGs) every N optimizer steps; one is
    always written on SIGINT/SIGTERM, after the step in progress (0: only then)"""
    keep_checkpoints: int = 2
    """checkpoints kept; an older one is deleted only after a newer one is complete"""
    resume: Optional[str] = None
    """continue the run stopped in this directory from its latest checkpoint, exactly, with its saved config
    (an option given with it that differs from the run is refused, except --checkpoint-every and
    --keep-checkpoints, which change no result); metrics.jsonl is cut back to that step"""


def _validate_supervised(cfg, data_example: str) -> None:
    """The checks SFT and the reward model share (same fields, same meaning)."""
    cfg.validate_model()
    check(cfg.checkpoint_every >= 0, "checkpoint_every", f"must be ≥ 0, got {cfg.checkpoint_every}")
    check(cfg.keep_checkpoints >= 1, "keep_checkpoints",
          f"must be ≥ 1 (the last good checkpoint is always kept), got {cfg.keep_checkpoints}")
    check(not (cfg.overwrite and cfg.resume), "overwrite", "cannot be combined with --resume", "drop one of the two")
    check(bool(cfg.model), "model", "is required", "pass --model DIR, a hub name or a .gguf file")
    check(bool(cfg.data), "data", "is required", f"pass --data {data_example}")
    for name in ("epochs", "batch_size", "micro_batch_size", "max_response_length"):
        check(getattr(cfg, name) >= 1, name, f"must be ≥ 1, got {getattr(cfg, name)}")
    check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    check(cfg.max_grad_norm >= 0, "max_grad_norm", f"must be ≥ 0 (0 = no clipping), got {cfg.max_grad_norm}")
    cfg.model, cfg.data = absolute_path(cfg.model), absolute_path(cfg.data)  # recorded in config.json


@dataclass
class SFTConfig(StageCheckpointOptions, ModelOptions):
    model: str = ""
    """base model: a local directory, a hub name (needs the files in the local cache), or a .gguf file"""
    data: str = ""
    """demonstrations: JSONL, .parquet or a datasets directory of {"prompt", "response"} (or chat "messages": the
    loss is on the last assistant turn only, earlier turns are the prompt)"""
    out: str = "runs/sft"
    """output directory (config.json, metrics.jsonl, checkpoints/, samples.md)"""
    overwrite: bool = False
    """replace the run already in --out (its config.json, metrics.jsonl, checkpoints/, samples.md, summary.json
    are removed first, after the model has loaded); without it (or --resume) an --out holding a run is refused"""
    epochs: int = 1
    """passes over the data"""
    batch_size: int = 8
    """examples per optimizer step"""
    micro_batch_size: int = 8
    """examples per forward pass (gradient accumulation; does not change the result)"""
    lr: float = 1e-4
    """Adam learning rate"""
    max_response_length: int = 128
    """response tokens kept (EOS appended after truncation so the model learns to stop)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    def validate(self) -> None:
        _validate_supervised(self, "demos.jsonl")


@dataclass
class RMConfig(StageCheckpointOptions, ModelOptions):
    model: str = ""
    """trunk of the reward model: a local directory, hub name, .gguf file, or an SFT run directory"""
    data: str = ""
    """preference pairs: JSONL, .parquet or a datasets directory of {"prompt", "chosen", "rejected"} (text or chat turns)"""
    out: str = "runs/rm"
    """output directory"""
    overwrite: bool = False
    """replace the run already in --out (its config.json, metrics.jsonl, checkpoints/, samples.md, summary.json
    are removed first, after the model has loaded); without it an --out holding a run is refused"""
    epochs: int = 1
    """passes over the training pairs"""
    batch_size: int = 8
    """pairs per optimizer step"""
    micro_batch_size: int = 8
    """pairs per forward pass (gradient accumulation)"""
    lr: float = 1e-4
    """Adam learning rate"""
    eval_fraction: float = 0.1
    """share of pairs held out for the pairwise accuracy (at least one pair when there are two or more)"""
    max_response_length: int = 128
    """response tokens kept"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    def validate(self) -> None:
        _validate_supervised(self, "prefs.jsonl")
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")


@dataclass
class PPOConfig(ModelOptions):
    policy: str = ""
    """initial policy (and reference): a local directory, hub name, .gguf file, or an SFT run directory"""
    reward: str = ""
    """a reward-model run directory (from `rlhf rm`) or a Python function 'module:function' that takes
    (prompts, responses) lists of str and returns floats"""
    prompts: str = ""
    """prompts: JSONL, .parquet or a datasets directory of {"prompt"} (text or chat turns, or "messages")"""
    out: str = "runs/ppo"
    """output directory"""
    overwrite: bool = False
    """replace the run already in --out (its config.json, metrics.jsonl, checkpoints/, samples.md, summary.json
    are removed first, after the model has loaded); without it (or --resume) an --out holding a run is refused"""
    updates: int = 10
    """number of PPO updates (each: generate a rollout batch, score, optimise)"""
    batch_size: int = 16
    """rollout batch: prompts answered per update"""
    num_minibatches: int = 2
    """minibatches per epoch, one optimizer step each"""
    micro_batch_size: int = 8
    """sequences per forward pass (gradient accumulation; does not change the result beyond float rounding —
    which trpo's conjugate gradient can amplify over updates at a small --cg-damping)"""
    forward_batch_size: int = 32
    """sequences per no-grad forward: the rollout's log-probs, values and reference log-probs, and reward-model
    scoring (no activations are kept for backward, so larger chunks than micro_batch_size fit and run faster)"""
    update_epochs: int = 2
    """PPO epochs over each rollout batch, a fresh shuffle each"""
    response_length: int = 32
    """maximum new tokens per response; a response without a stop token by then is truncated"""
    temperature: float = 0.7
    """sampling temperature; log-probs of policy, old policy and reference all divide logits by it (LM-6)"""
    top_k: int = 0
    """sample from the k most probable tokens only (0: all). The policy's log-probs are then those of the
    truncated, renormalised distribution, so the ratios stay exact; the reference's stay untruncated"""
    top_p: float = 1.0
    """nucleus sampling: the smallest most-probable set of tokens with probability ≥ top_p (1: all); log-probs
    of the truncated distribution, as for top_k"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of a response that never emitted a stop token (None: no penalty)"""
    surrogate: Literal["clip", "kl-penalty"] = "clip"
    """policy loss: rung 6 (clipped ratio) or rung 5 (adaptive KL penalty against the old policy)"""
    clip_coef: float = 0.2
    """ε of the clipped surrogate"""
    penalty_beta: float = 1.0
    """initial β of the rung-5 penalty KL(π_old‖π_θ) (×2 / ÷2 once per update around penalty_target_kl)"""
    penalty_target_kl: float = 0.01
    """target of the rung-5 penalty, mean per-token KL to the old policy"""
    kl_coef: float = 0.05
    """initial β of the per-token reward −β·kl_ref_k1 (KL to the reference)"""
    adaptive_kl: bool = True
    """adapt β with the Ziegler et al. controller towards target_kl_ref"""
    target_kl_ref: float = 6.0
    """target of the controller: mean per-sequence KL to the reference (nats)"""
    kl_horizon: int = 10000
    """horizon of the controller (sequences): β moves by at most 20%·batch_size/horizon per update"""
    whiten_rewards: bool = False
    """scale token rewards to unit variance (no mean shift) over the rollout batch; refused (and logged)
    on fewer than 8 tokens"""
    norm_adv: Literal["whiten", "off"] = "whiten"
    """advantage whitening over the whole rollout batch (mean shift and unit variance)"""
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"
    """token-loss aggregation: every token weighs the same, every sequence (length bias, LM-15), or Dr.GRPO's
    constant normaliser (sum over tokens / (batch × response_length))"""
    gamma: float = 1.0
    """discount over response tokens"""
    gae_lambda: float = 0.95
    """GAE λ"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    vf_clip: Optional[float] = 0.2
    """clip range of the clipped value loss (None: unclipped)"""
    ent_coef: float = 0.0
    """entropy bonus weight"""
    critic: Literal["head", "separate"] = "head"
    """value head on the policy trunk (one forward for log-probs and values) or a separate model"""
    lr: float = 1e-4
    """Adam learning rate (policy and critic)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    eval_prompts: int = 8
    """prompts held out to measure the reward before and after training (0: none)"""
    samples_per_update: int = 3
    """sample responses written to samples.md per update"""
    checkpoint_every: int = 10
    """write a full checkpoint (trainable weights, optimizer, β, RNGs, prompt cursor) every N updates;
    one is always written at the end and on SIGINT/SIGTERM (0: only then)"""
    keep_checkpoints: int = 2
    """complete checkpoints kept; an older one is deleted only after a newer one is complete"""
    resume: Optional[str] = None
    """continue the run in this directory from its latest checkpoint, exactly, with its saved config;
    metrics.jsonl and samples.md are cut back to the checkpointed update. An option given with --resume
    that differs from the saved run is refused, except --updates, which may be raised to extend the run
    (the sampling seed of an update is derived from the seed and its index, so the extension is
    deterministic), --reward, which a code reward must be given again, and --checkpoint-every /
    --keep-checkpoints, which change no result"""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """NaN/inf in rewards, advantages, losses, gradients or weights: stop with an error naming the quantity
    and the update, leaving the last good checkpoint intact (default), or skip the whole update (weights and
    optimizer restored, logged in metrics.jsonl as 'skipped' and on stderr). A reward function returning
    NaN/inf is always an error"""

    def validate(self, need_policy: bool = True, need_reward: bool = True, need_prompts: bool = True) -> None:
        """``need_policy``/``need_reward`` = False when the Python API passes those objects directly;
        ``need_prompts`` = False for the step-wise :class:`PPOTrainer`, whose caller brings the prompts."""
        self.validate_model()
        check(not need_policy or bool(self.policy), "policy", "is required", "pass --policy DIR, a hub name or a .gguf file")
        check(not need_reward or bool(self.reward), "reward", "is required", "pass --reward RM_DIR or --reward module:function")
        check(not need_prompts or bool(self.prompts), "prompts", "is required", "pass --prompts prompts.jsonl")
        for name in ("updates", "batch_size", "num_minibatches", "micro_batch_size", "forward_batch_size",
                     "update_epochs", "response_length", "kl_horizon"):
            check(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        check(self.batch_size % self.num_minibatches == 0, "num_minibatches",
              f"must divide batch_size={self.batch_size}, got {self.num_minibatches}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an integer ≥ 0 (0: off), got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1: off), got {self.top_p}")
        truncated = self.top_k > 0 or self.top_p < 1
        check(not (truncated and (self.surrogate == "kl-penalty" or self.update_rule == "trust-region")),
              "top_k" if self.top_k > 0 else "top_p",
              "top-k/top-p sampling with an exact KL(π_old‖π_θ) (ppo-kl's β, trpo's trust region): the truncated "
              "supports of π_old and π_θ can differ, which makes that KL infinite",
              "use a clipped or importance-sampled rung (ppo-clip, grpo, is-pg), or sample without truncation")
        check(not (self.precision == "fp16" and self.update_rule == "trust-region"), "precision",
              "fp16 needs a gradient scaler, and the trust-region update (trpo) takes no optimizer step to scale",
              "use --precision bf16 or fp32 with trpo")
        check(self.target_kl_ref > 0, "target_kl_ref", f"must be > 0, got {self.target_kl_ref}")
        factor = 1 - 0.2 * self.batch_size / self.kl_horizon  # the controller's step when the KL is below target
        check(not self.adaptive_kl or factor > 0, "kl_horizon",
              f"{self.kl_horizon} with batch_size={self.batch_size}: a KL to the reference below target multiplies "
              f"β by 1 − 0.2·batch_size/kl_horizon = {factor:.3g} (≤ 0: a β of 0 or below, a bonus for moving away "
              "from the reference)", f"use --kl-horizon > {self.batch_size / 5:g}, or --no-adaptive-kl")
        check(self.kl_coef >= 0, "kl_coef", f"must be ≥ 0, got {self.kl_coef}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.eval_prompts >= 0, "eval_prompts", f"must be ≥ 0, got {self.eval_prompts}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be ≥ 0, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints",
              f"must be ≥ 1 (the last good checkpoint is always kept), got {self.keep_checkpoints}")
        check(self.clip_coef > 0, "clip_coef", f"must be > 0 (the clip range 1 ± ε), got {self.clip_coef}")
        check(self.vf_coef >= 0, "vf_coef", f"must be ≥ 0, got {self.vf_coef}")
        check(self.vf_clip is None or self.vf_clip > 0, "vf_clip",
              f"must be > 0, got {self.vf_clip}", "pass a positive range, or leave it unset for no value clipping")
        check(self.ent_coef >= 0, "ent_coef", f"must be ≥ 0 (a negative bonus rewards certainty), got {self.ent_coef}")
        check(self.penalty_beta >= 0, "penalty_beta", f"must be ≥ 0, got {self.penalty_beta}")
        check(self.penalty_target_kl > 0, "penalty_target_kl", f"must be > 0, got {self.penalty_target_kl}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be ≥ 0 (0 = no clipping), got {self.max_grad_norm}")
        check(self.samples_per_update >= 0, "samples_per_update", f"must be ≥ 0, got {self.samples_per_update}")
        check(not (self.overwrite and self.resume), "overwrite", "cannot be combined with --resume", "drop one of the two")
        # local paths recorded absolute (config.json, checkpoints): a resume works from any directory
        self.policy, self.prompts = absolute_path(self.policy), absolute_path(self.prompts)
        self.reward = absolute_path(self.reward, code=True)

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    # The ladder's choices that `rlhf ppo` fixes (class attributes, not fields: PPO's config, --help and
    # checkpoints are unchanged). :class:`RLConfig` makes them fields, set by ``--algo``.
    advantage = "gae"
    baseline = "none"
    samples_per_prompt = 1
    scale_by_std = True
    clip_coef_high = None
    kl_in = "reward"
    kl_estimator = "k1"
    update_rule = "sgd"
    rollout_lag = 0
    is_correction = "truncate"
    is_cap = 2.0
    COMMAND = "ppo"


@dataclass(frozen=True)
class LMRung:
    """A rung of the ladder on tokens: a row of independent choices plus the config defaults that make it
    behave as the rung is meant to (DETAILS 17–18, docs/ladder.md "The ladder on tokens")."""
    name: str
    advantage: str    # "sequence" (R of the response on every token) | "baseline" (R − b) | "gae" (critic)
    baseline: str     # with "baseline": batch-mean | rloo | group-norm (objective.sequence_advantages)
    surrogate: str    # vanilla | is | kl-penalty | clip (objective.surrogate_loss)
    critic: str       # none | head
    defaults: dict = field(default_factory=dict)
    summary: str = ""
    update: str = "sgd"  # sgd (epochs × minibatches × micro-batches) | trust-region (lm/trust_region.py)


_ONE_STEP = dict(update_epochs=1, num_minibatches=1)
LM_RUNGS: dict[str, LMRung] = {r.name: r for r in [
    LMRung("pg", "sequence", "none", "vanilla", "none", dict(_ONE_STEP, norm_adv="off", samples_per_prompt=1),
           "rung 1 (REINFORCE): every token weighted by R = score − β·Σ kl_ref_k1"),
    LMRung("pg-baseline", "baseline", "batch-mean", "vanilla", "none", dict(_ONE_STEP, norm_adv="off"),
           "rung 2: R − b, b = batch mean | RLOO leave-one-out | group mean/std (--baseline)"),
    LMRung("rloo", "baseline", "rloo", "vanilla", "none", dict(_ONE_STEP, norm_adv="off", samples_per_prompt=4),
           "rung 2 as RLOO: K=4 samples per prompt, b = mean of the other K−1"),
    LMRung("grpo", "baseline", "group-norm", "clip", "none",
           dict(update_epochs=2, num_minibatches=2, norm_adv="off", samples_per_prompt=4),
           "rung 2's group-normalised advantage + rung 6's clipped ratio, 2 epochs, no critic"),
    LMRung("pg-rtg", "gae", "none", "vanilla", "head", dict(_ONE_STEP, norm_adv="whiten", gae_lambda=1.0),
           "rung 3: per-token reward-to-go − V (value head): GAE with λ=1, vanilla surrogate"),
    LMRung("is-pg", "gae", "none", "is", "head", dict(update_epochs=4, num_minibatches=2, norm_adv="whiten"),
           "rung 4: importance-sampled surrogate for 4 epochs, unconstrained (logs is_weight_var, ess)"),
    LMRung("ppo-kl", "gae", "none", "kl-penalty", "head", {},
           "rung 5: adaptive KL penalty to π_old (β×2 / β÷2 on the exact KL after the update)"),
    LMRung("ppo-clip", "gae", "none", "clip", "head", {}, "rung 6: the clipped ratio (= rlhf ppo)"),
    LMRung("trpo", "baseline", "rloo", "is", "none", dict(_ONE_STEP, norm_adv="off", samples_per_prompt=4),
           "rung 7: natural gradient by CG on Fisher-vector products of the exact per-token KL, step scaled to "
           "½sᵀFs = δ, line search accepting KL ≤ δ and a positive improvement; RLOO advantages, no critic",
           update="trust-region"),
]}
LM_LADDER = list(LM_RUNGS)
GROUP_BASELINES = ("rloo", "group-norm")


@dataclass
class RLConfig(PPOConfig):
    """``proxrl rlhf train --algo RUNG``: PPOConfig plus the ladder's choices. A choice left at None takes
    the rung's value (:data:`LM_RUNGS`), then PPO's default; it is resolved when the config is built, so
    set ``algo`` in the constructor (changing it afterwards does not re-resolve)."""

    surrogate: Optional[Literal["vanilla", "is", "kl-penalty", "clip"]] = None
    """policy loss: vanilla −E[A·log π] (rungs 1–3), importance-sampled (4), adaptive KL penalty (5), clipped
    ratio (6); default: from --algo"""
    update_epochs: Optional[int] = None
    """epochs over each rollout batch (default: from --algo; PPO's 2 for ppo-kl/ppo-clip)"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch, one optimizer step each (default: from --algo; PPO's 2 for ppo-kl/ppo-clip)"""
    norm_adv: Optional[Literal["whiten", "scale", "off"]] = None
    """advantage normalisation over the rollout batch: whiten (zero mean, unit std), scale (unit std, mean
    kept) or off (default: from --algo: off for the critic-free rungs, whiten otherwise)"""
    gae_lambda: Optional[float] = None
    """GAE λ (default: 1 for pg-rtg, else 0.95)"""
    critic: Optional[Literal["head", "separate", "none"]] = None
    """value head on the trunk, a separate model, or none (sequence advantages); default: from --algo"""
    algo: Literal["pg", "pg-baseline", "rloo", "grpo", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo"] = "ppo-clip"
    """the rung: pg | pg-baseline | rloo | grpo | pg-rtg | is-pg | ppo-kl | ppo-clip (= rlhf ppo) | trpo"""
    advantage: Optional[Literal["sequence", "baseline", "gae"]] = None
    """token weight: the sequence return R on every token, R minus a baseline, or GAE with the critic
    (default: from --algo)"""
    baseline: Optional[Literal["none", "batch-mean", "rloo", "group-norm"]] = None
    """with advantage=baseline: batch mean, RLOO leave-one-out mean over the prompt's K samples, or GRPO's
    group mean/std (default: from --algo)"""
    samples_per_prompt: Optional[int] = None
    """K responses sampled per prompt; batch_size counts responses and must be a multiple of K (default:
    from --algo; 4 when the baseline is rloo or group-norm)"""
    scale_by_std: bool = True
    """group-norm: divide by the group's std (False: Dr.GRPO, mean-centred only)"""
    clip_coef_low: Optional[float] = None
    """lower clip ε of the clipped ratio, r ≥ 1 − ε (default: clip_coef)"""
    clip_coef_high: Optional[float] = None
    """upper clip ε, r ≤ 1 + ε (DAPO's clip-higher when > clip_coef_low; default: clip_coef_low)"""
    kl_in: Literal["reward", "loss"] = "reward"
    """where the KL to the reference goes (β = kl_coef): 'reward' −β·k on every token's reward (Ziegler et
    al., the default), or 'loss' +β·mean(k(log π_θ, log π_ref)) added to the policy loss (GRPO); which
    combination with --kl-estimator is an unbiased gradient of which KL: docs/ladder.md"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """the estimator k of the KL to the reference: k1 = Δ, k2 = ½Δ², k3 = e^(−Δ) − 1 + Δ, Δ = log π − log π_ref
    (k1 in the reward and k2 in the loss give ∇KL(π‖π_ref); k3 in the loss gives the forward KL's gradient;
    k1 in the loss gives none)"""
    rollout_lag: int = 0
    """off-policy rollouts: responses sampled by the policy of L updates ago (the oldest there is in the first
    L updates), its log-probs recorded as the behaviour policy μ; 0: on-policy. Keeps L copies of the trained
    weights (small under LoRA)"""
    is_correction: Literal["none", "truncate", "mask"] = "truncate"
    """off-policy rollouts: per-token weight w = π_old/μ on the advantage — none (w = 1, biased), truncate
    (min(w, is_cap): truncated IS) or mask (tokens with w > is_cap dropped)"""
    is_cap: float = 2.0
    """the cap C of is_correction"""
    max_kl: float = 0.01
    """trpo: trust-region size δ on the mean per-token exact KL(π_old‖π_θ) over the response tokens"""
    cg_iters: int = 10
    """trpo: conjugate-gradient iterations of F s = g"""
    cg_damping: float = 0.01
    """trpo: damping λ of the CG solve (F + λI) s = g (the step is scaled with the undamped F)"""
    backtrack_coef: float = 0.8
    """trpo: line-search shrink factor"""
    backtrack_iters: int = 10
    """trpo: maximum line-search backtracks (0: only the full step is tried)"""
    out: str = "runs/rl"
    """output directory"""

    COMMAND = "train"

    def __post_init__(self):
        rung = LM_RUNGS.get(self.algo) if isinstance(self.algo, str) else None
        if rung is None:  # validate() names the field
            return
        choices = dict(advantage=rung.advantage, baseline=rung.baseline, surrogate=rung.surrogate,
                       critic=rung.critic, **rung.defaults)
        if self.baseline in GROUP_BASELINES and "samples_per_prompt" not in rung.defaults:
            choices["samples_per_prompt"] = 4
        if self.baseline is not None and self.baseline != "none" and self.advantage is None \
                and rung.advantage == "sequence":
            choices["advantage"] = "baseline"
        ppo_defaults = {f.name: f.default for f in fields(PPOConfig)}
        for name in ("surrogate", "update_epochs", "num_minibatches", "norm_adv", "gae_lambda", "critic",
                     "advantage", "baseline", "samples_per_prompt"):
            if getattr(self, name) is None:
                setattr(self, name, choices.get(name, ppo_defaults.get(name, getattr(PPOConfig, name))))
        if self.clip_coef_low is None:
            self.clip_coef_low = self.clip_coef
        self.clip_coef = self.clip_coef_low  # the field every surrogate reads
        if self.clip_coef_high is None:
            self.clip_coef_high = self.clip_coef_low

    @property
    def update_rule(self) -> str:
        """``sgd`` or ``trust-region``: the rung's update (not a choice of its own)."""
        rung = LM_RUNGS.get(self.algo) if isinstance(self.algo, str) else None
        return rung.update if rung is not None else "sgd"

    def validate(self, need_policy: bool = True, need_reward: bool = True, need_prompts: bool = True) -> None:
        check_field_types(self)
        check(self.algo in LM_RUNGS, "algo", f"unknown rung {self.algo!r}", "choose one of " + ", ".join(LM_LADDER))
        check(isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 1, "samples_per_prompt",
              f"must be ≥ 1, got {self.samples_per_prompt}")
        super().validate(need_policy, need_reward, need_prompts)
        k = self.samples_per_prompt
        check(self.batch_size % k == 0, "samples_per_prompt",
              f"must divide batch_size={self.batch_size} (batch_size counts responses), got {k}")
        if self.advantage == "baseline":
            check(self.baseline != "none", "baseline", "advantage=baseline needs a baseline",
                  "pass --baseline batch-mean, rloo or group-norm")
            check(self.baseline not in GROUP_BASELINES or k >= 2, "samples_per_prompt",
                  f"baseline {self.baseline} needs ≥ 2 samples per prompt, got {k}", "pass --samples-per-prompt 4")
        check(self.advantage != "gae" or self.critic != "none", "critic",
              "advantage=gae needs a critic", "pass --critic head, or --advantage sequence/baseline")
        check(self.advantage == "gae" or self.critic == "none", "critic",
              f"advantage={self.advantage} trains no critic", "pass --critic none, or --advantage gae")
        check(0 < self.clip_coef_low < 1, "clip_coef_low", f"must be in (0, 1) (the ratio's lower bound 1 − ε must be "
              f"positive), got {self.clip_coef_low}")
        check(self.clip_coef_high > 0, "clip_coef_high", f"must be > 0, got {self.clip_coef_high}")
        check(self.kl_in in ("reward", "loss"), "kl_in", f"must be reward or loss, got {self.kl_in!r}")
        check(self.kl_estimator in ("k1", "k2", "k3"), "kl_estimator", f"must be k1, k2 or k3, got {self.kl_estimator!r}")
        check(self.loss_agg in ("token-mean", "seq-mean", "constant"), "loss_agg",
              f"must be token-mean, seq-mean or constant, got {self.loss_agg!r}")
        check(isinstance(self.rollout_lag, int) and self.rollout_lag >= 0, "rollout_lag",
              f"must be an integer ≥ 0 (updates between the sampling policy and the trained one), got {self.rollout_lag}")
        check(self.is_correction in ("none", "truncate", "mask"), "is_correction",
              f"must be none, truncate or mask, got {self.is_correction!r}")
        check(self.is_cap >= 1, "is_cap", f"must be ≥ 1 (weights up to C are kept), got {self.is_cap}")
        if self.update_rule == "trust-region":
            check(self.surrogate == "is", "surrogate", f"trpo maximises the importance-sampled surrogate under its "
                  f"KL constraint, got {self.surrogate!r}", "drop --surrogate (trpo's is fixed)")
            check(self.critic == "none", "critic", "trpo fits no critic (a value head trained by SGD on the policy's "
                  "trunk would move the policy outside the trust region)",
                  "pass --critic none with --advantage baseline (the default: rloo)")
            check(self.ent_coef == 0, "ent_coef", f"trpo's surrogate has no entropy bonus, got {self.ent_coef}",
                  "pass --ent-coef 0")
            check(self.max_kl > 0, "max_kl", f"must be > 0, got {self.max_kl}")
            check(isinstance(self.cg_iters, int) and self.cg_iters >= 1, "cg_iters", f"must be ≥ 1, got {self.cg_iters}")
            check(self.cg_damping >= 0, "cg_damping", f"must be ≥ 0, got {self.cg_damping}")
            check(0 < self.backtrack_coef < 1, "backtrack_coef", f"must be in (0, 1), got {self.backtrack_coef}")
            check(isinstance(self.backtrack_iters, int) and self.backtrack_iters >= 0, "backtrack_iters",
                  f"must be an integer ≥ 0, got {self.backtrack_iters}")


def ignored_options(cfg, given) -> list[str]:
    """The options in ``given`` that ``cfg``'s rung and settings do not use, each as ``field: why`` (said on
    stderr rather than accepted in silence)."""
    trust = getattr(cfg, "update_rule", "sgd") == "trust-region"
    clipped = getattr(cfg, "surrogate", "clip") == "clip" and not trust
    checks = {
        "update_epochs": (trust, "trpo takes one natural-gradient step per update"),
        "num_minibatches": (trust, "trpo takes one natural-gradient step on the whole batch"),
        "clip_coef_low": (not clipped, "only the clipped surrogate (ppo-clip, grpo) clips the ratio"),
        "clip_coef_high": (not clipped, "only the clipped surrogate (ppo-clip, grpo) clips the ratio"),
        "max_kl": (not trust and hasattr(cfg, "max_kl"), "only trpo has a trust region"),
        "train_layers": (getattr(cfg, "finetune", "lora") != "layers", "it counts blocks for --finetune layers"),
        "scale_by_std": (getattr(cfg, "baseline", "group-norm") != "group-norm",
                         "only the group-norm baseline divides by the group's std"),
    }
    return [f"{name}: has no effect here ({why})" for name, (ignored, why) in checks.items() if ignored and name in given]


@dataclass
class LMLadderConfig(ModelOptions):
    """``proxrl ladder --lm``: every rung of the ladder on tokens × seeds on one task (the same policy, reward,
    prompts and budget for each), compared in ladder.md / ladder.png / ladder.json."""

    policy: str = ""
    """the policy every rung starts from: a model directory, a .gguf file or a proxrl SFT run"""
    reward: str = ""
    """reward-model run directory, or module:function / file.py:function taking (prompts, responses)"""
    prompts: str = ""
    """prompts: JSONL, .parquet or a datasets directory of {"prompt"} (text or chat turns)"""
    algos: tuple[str, ...] = tuple(LM_LADDER)
    """rungs to run, in ladder order"""
    seeds: int = 1
    """seeds per rung (seed, seed + 1, …, seed + seeds − 1; --seed is 0 by default)"""
    updates: int = 10
    """updates per run (the same budget for every rung)"""
    batch_size: int = 16
    """responses per update (a multiple of the rungs' samples per prompt, 4 for rloo/grpo/trpo)"""
    micro_batch_size: int = 8
    """sequences per forward pass"""
    response_length: int = 16
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature"""
    lr: float = 1e-4
    """learning rate of every rung's SGD (trpo takes its step from max_kl instead)"""
    kl_coef: float = 0.05
    """β of the KL to the reference"""
    eval_prompts: int = 8
    """prompts held out and answered before and after each run"""
    out: str = "ladder-lm"
    """output directory: <out>/<rung>/seed<k>/ run directories plus ladder.md, ladder.png, ladder.json"""
    overwrite: bool = False
    """replace the runs of an earlier ladder in --out (without it such an --out is refused)"""

    def run_config(self, algo: str, seed: int) -> "RLConfig":
        """The config of one run of the ladder, validated."""
        cfg = RLConfig(algo=algo, policy=self.policy, reward=self.reward, prompts=self.prompts,
                       out=str(Path(self.out) / algo / f"seed{seed}"), overwrite=self.overwrite, updates=self.updates,
                       batch_size=self.batch_size, micro_batch_size=min(self.micro_batch_size, self.batch_size),
                       response_length=self.response_length, temperature=self.temperature, lr=self.lr,
                       kl_coef=self.kl_coef, eval_prompts=self.eval_prompts, checkpoint_every=0, seed=seed,
                       **{f.name: getattr(self, f.name) for f in fields(ModelOptions) if f.name != "seed"})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_field_types(self)
        check(bool(self.algos), "algos", "no rungs given", "choose from " + ", ".join(LM_LADDER))
        for a in self.algos:
            check(a in LM_RUNGS, "algos", f"unknown rung {a!r}", "choose from " + ", ".join(LM_LADDER))
        twice = sorted({a for a in self.algos if list(self.algos).count(a) > 1})
        if twice:  # two runs would share one run directory
            raise ConfigError("algos", f"rung {twice[0]} is given twice", "give each rung once")
        check(isinstance(self.seeds, int) and self.seeds >= 1, "seeds", f"must be ≥ 1, got {self.seeds}")


@dataclass
class DemoConfig:
    """``proxrl rlhf demo``. The defaults are the measured budget of BENCHMARKS.md (RLHF demo): within
    10 minutes on a 2-core CPU the held-out improvement is ≥ 3 of its standard errors for 4+ of seeds 0–4."""

    out: str = "runs/rlhf-demo"
    """output directory: everything is kept (runs, summary.json, demo.png, demo.md)"""
    quick: bool = False
    """a smoke-test variant on a tiny random model (seconds, not minutes)"""
    with_rm: bool = False
    """also show the reward-model path: pairs labelled by VADER → `rlhf rm` → PPO against the learned RM,
    measured on the held-out prompts with both the RM's score and VADER"""
    algo: Literal["pg", "pg-baseline", "rloo", "grpo", "pg-rtg", "is-pg", "ppo-kl", "ppo-clip", "trpo"] = "ppo-clip"
    """the rung trained against VADER (and the learned RM): ppo-clip (PPO), or any rung of the ladder on tokens"""
    updates: int = 30
    """RL updates"""
    batch_size: int = 16
    """prompts answered per update"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch, one optimizer step each (default: the rung's; 2 for ppo-clip)"""
    update_epochs: Optional[int] = None
    """epochs over each rollout batch (default: the rung's; 2 for ppo-clip)"""
    response_length: int = 20
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature (training and held-out evaluation)"""
    lr: float = 1e-3
    """learning rate of the LoRA adapters and value head"""
    lora_r: int = 8
    """LoRA rank (alpha = 2·r)"""
    kl_coef: float = 0.07
    """β of the per-token KL-to-reference penalty, fixed (a run of a few dozen updates is too short for the
    adaptive controller: its KL starts at 0, so it first lowers β and overshoots later)"""
    max_kl_ref: float = 12.0
    """the KL budget: the held-out KL to the reference after training (k1, nats per response at the
    sampling temperature) must stay within it for the demo to count as a success"""
    eval_prompts: int = 64
    """held-out prompts, answered before and after training"""
    eval_samples: int = 4
    """samples per held-out prompt (the same sampling streams before and after)"""
    rm_pairs: int = 128
    """with --with-rm: training prompts whose two samples VADER labels as a preference pair"""
    seed: int = 0
    """seed of the prompt split, initialisation, sampling and shuffling"""

    def validate(self) -> None:
        check_field_types(self)
        check_finite_floats(self)
        for name in ("updates", "batch_size", "response_length", "lora_r", "eval_samples", "rm_pairs"):
            check(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("num_minibatches", "update_epochs"):  # divisibility etc.: the rung's config checks the rest
            check(getattr(self, name) is None or getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        check(self.eval_prompts >= 2, "eval_prompts", f"must be ≥ 2 (a standard error needs two), got {self.eval_prompts}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.kl_coef >= 0, "kl_coef", f"must be ≥ 0, got {self.kl_coef}")
        check(self.max_kl_ref > 0, "max_kl_ref", f"must be > 0, got {self.max_kl_ref}")
