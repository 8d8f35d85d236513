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

from dataclasses import asdict, dataclass
from typing import Literal, Optional

from ..errors import check


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
    """parameter dtype"""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """wrap each prompt as a user turn with the tokenizer's chat template ('auto': when it has one)"""
    max_prompt_length: int = 128
    """prompts longer than this many tokens keep their last tokens"""
    seed: int = 0
    """seed of torch sampling, shuffling and initialisation"""
    device: str = "cpu"
    """torch device"""

    def validate_model(self) -> None:
        check(self.train_layers >= 1, "train_layers", f"must be ≥ 1, got {self.train_layers}")
        check(self.lora_r >= 1, "lora_r", f"must be ≥ 1, got {self.lora_r}")
        check(self.max_prompt_length >= 1, "max_prompt_length", f"must be ≥ 1, got {self.max_prompt_length}")

    def to_dict(self) -> dict:
        return asdict(self)


def _validate_supervised(cfg, data_example: str) -> None:
    """The checks SFT and the reward model share (same fields, same meaning)."""
    cfg.validate_model()
    check(bool(cfg.model), "model", "is required", "pass --model DIR, a hub name or a .gguf file")
    check(bool(cfg.data), "data", "is required", f"pass --data {data_example}")
    for name in ("epochs", "batch_size", "micro_batch_size", "max_response_length"):
        check(getattr(cfg, name) >= 1, name, f"must be ≥ 1, got {getattr(cfg, name)}")
    check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")


@dataclass
class SFTConfig(ModelOptions):
    model: str = ""
    """base model: a local directory, a hub name (needs the files in the local cache), or a .gguf file"""
    data: str = ""
    """JSONL with {"prompt", "response"} per line"""
    out: str = "runs/sft"
    """output directory (config.json, metrics.jsonl, checkpoints/, samples.md)"""
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
class RMConfig(ModelOptions):
    model: str = ""
    """trunk of the reward model: a local directory, hub name, .gguf file, or an SFT run directory"""
    data: str = ""
    """JSONL with {"prompt", "chosen", "rejected"} per line"""
    out: str = "runs/rm"
    """output directory"""
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
    """JSONL with {"prompt"} per line"""
    out: str = "runs/ppo"
    """output directory"""
    updates: int = 10
    """number of PPO updates (each: generate a rollout batch, score, optimise)"""
    batch_size: int = 16
    """rollout batch: prompts answered per update"""
    num_minibatches: int = 2
    """minibatches per epoch, one optimizer step each"""
    micro_batch_size: int = 8
    """sequences per forward pass (gradient accumulation; does not change the result)"""
    forward_batch_size: int = 32
    """sequences per no-grad forward: the rollout's log-probs, values and reference log-probs, and reward-model
    scoring (no activations are kept for backward, so larger chunks than micro_batch_size fit and run faster)"""
    update_epochs: int = 2
    """PPO epochs over each rollout batch, a fresh shuffle each"""
    response_length: int = 32
    """maximum new tokens per response; a response without a stop token by then is truncated"""
    temperature: float = 0.7
    """sampling temperature; log-probs of policy, old policy and reference all divide logits by it (LM-6)"""
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
    loss_agg: Literal["token-mean", "seq-mean"] = "token-mean"
    """token-loss aggregation: every token weighs the same, or every sequence (length bias, LM-15)"""
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
    """continue the run in this directory from its latest checkpoint, exactly, with its saved config (the
    other options are ignored); metrics.jsonl and samples.md are cut back to the checkpointed update"""
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
        check(self.target_kl_ref > 0, "target_kl_ref", f"must be > 0, got {self.target_kl_ref}")
        check(self.kl_coef >= 0, "kl_coef", f"must be ≥ 0, got {self.kl_coef}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.eval_prompts >= 0, "eval_prompts", f"must be ≥ 0, got {self.eval_prompts}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be ≥ 0, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints",
              f"must be ≥ 1 (the last good checkpoint is always kept), got {self.keep_checkpoints}")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


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
    updates: int = 40
    """PPO updates"""
    batch_size: int = 16
    """prompts answered per update"""
    num_minibatches: int = 2
    """minibatches per PPO epoch (one optimizer step each)"""
    update_epochs: int = 2
    """PPO epochs over each rollout batch"""
    response_length: int = 20
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature (training and held-out evaluation)"""
    lr: float = 3e-4
    """learning rate of the LoRA adapters and value head"""
    lora_r: int = 8
    """LoRA rank (alpha = 2·r)"""
    kl_coef: float = 0.05
    """initial β of the KL-to-reference penalty"""
    target_kl_ref: float = 6.0
    """target of the adaptive β controller: KL to the reference, nats per sequence; the held-out KL after
    training must stay within it"""
    kl_horizon: int = 200
    """horizon of the β controller (sequences)"""
    eval_prompts: int = 64
    """held-out prompts, answered before and after training"""
    eval_samples: int = 2
    """samples per held-out prompt (the same sampling streams before and after)"""
    rm_pairs: int = 128
    """with --with-rm: training prompts whose two samples VADER labels as a preference pair"""
    seed: int = 0
    """seed of the prompt split, initialisation, sampling and shuffling"""

    def validate(self) -> None:
        for name in ("updates", "batch_size", "num_minibatches", "update_epochs", "response_length", "lora_r",
                     "kl_horizon", "eval_samples", "rm_pairs"):
            check(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        check(self.eval_prompts >= 2, "eval_prompts", f"must be ≥ 2 (a standard error needs two), got {self.eval_prompts}")
        check(self.batch_size % self.num_minibatches == 0, "num_minibatches",
              f"must divide batch_size={self.batch_size}, got {self.num_minibatches}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.kl_coef >= 0, "kl_coef", f"must be ≥ 0, got {self.kl_coef}")
        check(self.target_kl_ref > 0, "target_kl_ref", f"must be > 0, got {self.target_kl_ref}")
