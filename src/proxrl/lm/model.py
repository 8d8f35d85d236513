"""Loading causal LMs, fine-tuning modes, token log-probs, the critic and the reward model.

Named choices (DETAILS LM side), each pinned by a test in ``tests/test_lm_model.py``:

* LM-1 **pad ≠ eos.** When a tokenizer has no pad token, or pads with EOS, an existing non-EOS special
  token (unk, then bos) becomes the pad; only if there is none is ``<|pad|>`` added (embeddings resized).
  Masks are never derived from the pad id anyway: responses are cut at their first stop token.
* LM-5 **left padding with position ids** ``cumsum(mask) − 1`` in every training forward, so a padded
  and an unpadded sequence give the same logits.
* LM-6 **temperature**: log-probs are ``log_softmax(logits / T)`` for the policy, the old policy and the
  reference alike; sampling uses the full distribution (top_k=0, top_p=1), drawn by
  :class:`InverseCDFSampler`.
* LM-7 **dropout off**: every model is kept in ``eval()`` mode, also while it is trained.
* LM-13 **critic**: a value head on the policy trunk (one forward gives log-probs and values) or a separate
  model; heads are initialised N(0, 1/√(d+1)) with zero bias (Ziegler et al. 2019).
* LM-14 **reference**: with LoRA, the base model with the adapter disabled (no second copy); otherwise a
  frozen copy of the initial policy.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..errors import CheckpointError, ConfigError
from .config import ModelOptions

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RUN_CONFIG = "config.json"


# --------------------------------------------------------------------------- loading
def read_run_config(path: str | Path) -> Optional[dict]:
    """The config of a proxrl run directory (``config.json`` with a ``stage`` key), or None."""
    cfg = Path(path) / RUN_CONFIG
    if not cfg.is_file():
        return None
    try:
        obj = json.loads(cfg.read_text())
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "stage" in obj else None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    run = read_run_config(spec)
    if run is not None:
        return load_tokenizer(run["base_model"])
    p = Path(spec)
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a tokenizer from {spec!r}: {str(e).splitlines()[0]}") from None


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32):
    """A plain ``AutoModelForCausalLM`` from a local directory, a hub name (offline: from the local cache),
    a ``.gguf`` file (de-quantised by transformers), or a proxrl SFT/PPO run directory (its trained weights
    loaded into its base model; a LoRA adapter is merged so the result is again a plain model)."""
    from transformers import AutoModelForCausalLM

    run = read_run_config(spec)
    if run is not None:
        return load_run_policy(spec, run, dtype)
    p = Path(spec)
    try:
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ConfigError("model", f"no such GGUF file: {spec}")
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        else:
            # safetensors only: a pytorch_model.bin would be unpickled by torch.load (issue 5, safe loading)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a causal LM from {spec!r}: {str(e).splitlines()[0]}") from None
    fuse_activations(model)
    return model.eval()


def fuse_activations(model: nn.Module) -> int:
    """Swap Python-composed tanh-GELU modules (``gelu_new`` of GPT-2 and its descendants, ``gelu_fast``) for
    transformers' own ``GELUTanh`` — torch's fused ``gelu(approximate="tanh")``: the same function
    0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in one kernel instead of eight elementwise ones, which on a small
    GPT-2 are the costliest ops of a training step. Results differ by float rounding only. Models with other
    activations (SiLU in Llama/SmolLM2, exact GELU) are untouched. Returns the number of modules swapped."""
    try:
        from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
    except ImportError:  # an older transformers without these classes: nothing to swap
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def load_run_policy(run_dir: str | Path, run: dict, dtype: torch.dtype):
    opts = ModelOptions(**{k: v for k, v in run["config"].items() if k in ModelOptions.__dataclass_fields__})
    base = load_causal_lm(run["base_model"], dtype)
    tok = load_tokenizer(run["base_model"])
    ensure_pad_token(tok, base)
    freeze(base)
    lm = apply_finetune(base, opts)
    tensors, _ = checkpoint.load(Path(run_dir) / "checkpoints")
    prefix = "policy.lm."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError(f"{run_dir}: checkpoint holds no policy weights")
    load_into(lm, own)
    if opts.finetune == "lora":
        lm = lm.merge_and_unload()
    freeze(lm)
    return lm.eval()


def load_into(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected:
        raise CheckpointError(f"checkpoint tensors do not fit the model: {unexpected[:3]}")


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def ensure_pad_token(tokenizer, model=None) -> int:
    """Make the pad token distinct from EOS (DETAILS LM-1); pad on the left. Returns the pad id."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    for cand in (tokenizer.unk_token, tokenizer.bos_token):
        if cand is not None and tokenizer.convert_tokens_to_ids(cand) != eos:
            tokenizer.pad_token = cand
            return tokenizer.pad_token_id
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.pad_token_id


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS of the tokenizer plus those of the model's generation config (chat models stop at end-of-turn)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    ids.discard(tokenizer.pad_token_id)
    if not ids:
        raise ConfigError("model", "the tokenizer has no EOS token", "responses could never stop")
    return sorted(ids)


def use_chat_template(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ConfigError("chat_template", "is 'on' but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


def encode_prompt(tokenizer, text: str, chat: bool, max_len: int) -> list[int]:
    """Token ids of one prompt (chat-formatted with the generation prompt when ``chat``), keeping the last
    ``max_len`` tokens."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return ids[-max_len:]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``[B, L]`` ids and mask, padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int, length: Optional[int] = None) -> tuple[Tensor, Tensor]:
    L = length if length is not None else max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:L]
        if s:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


# --------------------------------------------------------------------------- fine-tuning modes
def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the one whose length is ``num_hidden_layers``)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ConfigError("finetune", "cannot find the transformer blocks of this model", "use --finetune lora or full")


def apply_finetune(model: nn.Module, opts: ModelOptions) -> nn.Module:
    """Mark what trains: LoRA adapters (returns a peft model), all weights, or the last blocks."""
    if opts.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        target = opts.lora_target if opts.lora_target == "all-linear" else [t.strip() for t in opts.lora_target.split(",")]
        cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0, bias="none",
                         target_modules=target, task_type="CAUSAL_LM")
        freeze(model)
        peft_model = get_peft_model(model, cfg)
        return peft_model.eval()
    if opts.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.eval()
    if opts.finetune == "layers":
        freeze(model)
        _, blocks = transformer_blocks(model)
        k = min(opts.train_layers, len(blocks))
        for block in list(blocks)[len(blocks) - k:]:
            for p in block.parameters():
                p.requires_grad_(True)
        return model.eval()
    raise ConfigError("finetune", f"must be lora, full or layers, got {opts.finetune!r}")


# --------------------------------------------------------------------------- forwards
def position_ids(mask: Tensor) -> Tensor:
    """``cumsum(mask) − 1`` (0 on left padding): a left-padded sequence gets the positions it would have
    unpadded (DETAILS LM-5)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model: nn.Module, ids: Tensor, mask: Tensor, keep_logits: int, hidden: bool = False):
    """One forward with explicit position ids; only the last ``keep_logits`` positions get logits
    (the vocabulary projection of prompt tokens is never computed)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                logits_to_keep=keep_logits, output_hidden_states=hidden)
    logits = out.logits[:, -keep_logits:] if keep_logits else out.logits
    return logits, (out.hidden_states[-1] if hidden else None)


def log_probs_all(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` over the vocabulary (bfloat16 logits are normalised in float32)."""
    x = logits.float() if logits.dtype == torch.bfloat16 else logits
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)


def token_logp(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` at ``tokens``: ``[B, T, V]``, ``[B, T]`` → ``[B, T]``."""
    return log_probs_all(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class InverseCDFSampler:
    """Exact sampling from ``softmax(logits / T)`` for ``generate``, as the last logits processor of a greedy
    decode: it draws one token per row by inverting the CDF with a single uniform (float64 cumulative sum, so
    rounding cannot move probability between tokens; a zero-probability token is never drawn), and returns
    logits that are −inf everywhere except at the drawn token, which greedy decoding then takes. Same
    distribution as ``do_sample=True`` with ``temperature=T, top_k=0, top_p=1`` (LM-6), without
    ``torch.multinomial``'s exponential draw over the whole vocabulary at every step (14 ms of a 90 ms step
    of SmolLM2-135M at batch 16 on 2 CPU cores), and immune to sampling defaults in a model's
    ``generation_config`` (top-k/top-p warpers are never built for greedy decoding)."""

    def __init__(self, temperature: float = 1.0, generator: Optional[torch.Generator] = None):
        self.temperature = float(temperature)
        self.generator = generator

    def draw(self, logits: Tensor) -> Tensor:
        """One token index per row of ``logits`` ``[B, V]``: ``[B]``."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        cdf = probs.cumsum(-1, dtype=torch.float64)                  # [B, V], cdf[:, -1] ≈ 1
        u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=self.generator)
        u = u * cdf[:, -1:]                                          # uniform on [0, total): no clamp bias
        # #{k : F(k) ≤ u}: the token whose CDF step contains u
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(-1)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        tok = self.draw(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok[:, None], 0.0)


def last_real_index(mask: Tensor) -> Tensor:
    """Index of the last position with mask 1 in each row, whatever the padding side: ``[B]``."""
    L = mask.shape[-1]
    ar = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), ar, torch.full_like(ar, -1)).max(-1).values.clamp(min=0)


def make_head(d: int, dtype: torch.dtype) -> nn.Linear:
    """Scalar head initialised N(0, 1/√(d+1)) with zero bias (Ziegler et al. 2019; DETAILS LM-13)."""
    head = nn.Linear(d, 1, dtype=dtype)
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(d + 1))
    nn.init.zeros_(head.bias)
    return head


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


class LMPolicy(nn.Module):
    """A causal LM as a policy over tokens, with its critic and its frozen reference.

    ``forward`` returns per-response-token ``logp`` (temperature-scaled), ``values`` V(s_t) read at the
    position *before* response token t (the state in which it was chosen) and the entropy.
    """

    def __init__(self, base: nn.Module, tokenizer, opts: ModelOptions, critic: str = "head"):
        super().__init__()
        self.tokenizer = tokenizer
        self.opts = opts
        self.critic_mode = critic
        dtype = next(base.parameters()).dtype
        freeze(base)
        self.is_lora = opts.finetune == "lora"
        # the reference: the base itself (adapter disabled) with LoRA, else a frozen copy (LM-14)
        self.ref_lm = None if self.is_lora else freeze(copy.deepcopy(base))
        critic_base = copy.deepcopy(base) if critic == "separate" else None
        self.lm = apply_finetune(base, opts)
        self.critic_lm = apply_finetune(critic_base, opts) if critic_base is not None else None
        self.value_head = make_head(hidden_size(base), dtype)
        self.eval()

    def train(self, mode: bool = True):  # dropout stays off (LM-7): the module never leaves eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.value_head.weight.dtype

    def forward(self, ids: Tensor, mask: Tensor, n_resp: int, temperature: float = 1.0, values: bool = True,
                entropy: bool = True, entropy_grad: bool = False):
        """``ids``/``mask`` ``[B, P+R]`` = left-padded prompt ‖ right-padded response; returns ``logp``
        ``[B, R]``, ``values`` ``[B, R]`` (or None), ``entropy`` ``[B, R]`` (or None; detached unless
        ``entropy_grad``)."""
        shared = values and self.critic_lm is None
        # [B, R+1, V]: position P-1+t predicts response token t; the last position predicts nothing. It is
        # scored against a dummy token and dropped AFTER the vocabulary reduction, so that backward never
        # zero-fills a [B, R+1, V] gradient for a slice of the logits
        logits, h = forward(self.lm, ids, mask, n_resp + 1, hidden=shared)
        logp_all = log_probs_all(logits, temperature)
        resp = torch.nn.functional.pad(ids[:, -n_resp:], (0, 1))
        logp = logp_all.gather(-1, resp.unsqueeze(-1)).squeeze(-1)[:, :-1]
        ent = None
        if entropy:  # from the same log-softmax (one normalisation of the logits, not two)
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                lp = logp_all if entropy_grad else logp_all.detach()
                ent = -(lp.exp() * lp).sum(-1)[:, :-1]
        v = None
        if values:
            if h is None:
                _, h = forward(self.critic_lm, ids, mask, 1, hidden=True)
            v = self.value_head(h[:, -n_resp - 1:-1]).squeeze(-1)  # [B, R]
        return logp, v, ent

    def ref_logp(self, ids: Tensor, mask: Tensor, n_resp: int, temperature: float = 1.0) -> Tensor:
        if self.is_lora:
            with self.lm.disable_adapter():
                logits, _ = forward(self.lm, ids, mask, n_resp + 1)
        else:
            logits, _ = forward(self.ref_lm, ids, mask, n_resp + 1)
        return token_logp(logits[:, :-1], ids[:, -n_resp:], temperature)

    def generator(self) -> nn.Module:
        return self.lm

    def trainable_state(self) -> dict[str, Tensor]:
        """Only what trains (LoRA adapters, or the trained weights) and the value head: the checkpoint."""
        out = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[name] = p.detach()
        return out

    def load_trainable(self, tensors: dict[str, Tensor]) -> None:
        load_into(self, tensors)


def build_policy(spec: str, opts: ModelOptions, critic: str = "head") -> LMPolicy:
    dtype = DTYPES[opts.dtype]
    torch.manual_seed(opts.seed)
    base = load_causal_lm(spec, dtype)
    tok = load_tokenizer(spec)
    ensure_pad_token(tok, base)
    return LMPolicy(base, tok, opts, critic)


class RewardModel(nn.Module):
    """The LM trunk with a scalar head; the score is read at the last real token (DETAILS LM-4) and
    normalised with statistics measured after training: ``(r − score_mean) / score_std``."""

    def __init__(self, base: nn.Module, tokenizer, opts: ModelOptions):
        super().__init__()
        self.tokenizer = tokenizer
        self.opts = opts
        dtype = next(base.parameters()).dtype
        freeze(base)
        self.lm = apply_finetune(base, opts)
        self.head = make_head(hidden_size(base), dtype)
        self.register_buffer("score_mean", torch.zeros((), dtype=dtype))
        self.register_buffer("score_std", torch.ones((), dtype=dtype))
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def raw(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Unnormalised score ``[B]`` at the last real token."""
        _, h = forward(self.lm, ids, mask, 1, hidden=True)
        last = last_real_index(mask)  # [B]
        h_last = h[torch.arange(h.shape[0]), last]  # [B, d]
        return self.head(h_last).squeeze(-1)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return (self.raw(ids, mask) - self.score_mean) / self.score_std

    def trainable_state(self) -> dict[str, Tensor]:
        out = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        out["score_mean"], out["score_std"] = self.score_mean, self.score_std
        return out


def build_reward_model(spec: str, opts: ModelOptions) -> RewardModel:
    dtype = DTYPES[opts.dtype]
    torch.manual_seed(opts.seed)
    base = load_causal_lm(spec, dtype)
    tok = load_tokenizer(spec)
    ensure_pad_token(tok, base)
    return RewardModel(base, tok, opts)


def load_reward_model(run_dir: str | Path) -> RewardModel:
    """A trained reward model from an ``rlhf rm`` run directory (LoRA kept unmerged: it is only scored)."""
    run = read_run_config(run_dir)
    if run is None or run.get("stage") != "rm":
        raise ConfigError("reward", f"{run_dir} is not a reward-model run directory (no config.json with stage 'rm')")
    opts = ModelOptions(**{k: v for k, v in run["config"].items() if k in ModelOptions.__dataclass_fields__})
    rm = build_reward_model(run["base_model"], opts)
    tensors, _ = checkpoint.load(Path(run_dir) / "checkpoints")
    load_into(rm, tensors)
    freeze(rm)
    return rm
