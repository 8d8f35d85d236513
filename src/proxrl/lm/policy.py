"""A causal LM as a policy over tokens (with its critic and frozen reference), and the reward model.

Named choices (DETAILS LM side), each pinned by a test in ``tests/test_lm_model.py``:

* LM-5 **left padding with position ids** ``cumsum(mask) − 1`` in every training forward, so a padded
  and an unpadded sequence give the same logits.
* LM-6 **temperature**: log-probs are ``log_softmax(logits / T)`` for the policy, the old policy and the
  reference alike (the sampler draws from the same distribution, :mod:`proxrl.lm.sampling`).
* LM-7 **dropout off**: every model is kept in ``eval()`` mode, also while it is trained.
* LM-13 **critic**: a value head on the policy trunk (one forward gives log-probs and values) or a separate
  model; heads are initialised N(0, 1/√(d+1)) with zero bias (Ziegler et al. 2019).
* LM-14 **reference**: with LoRA, the base model with the adapter disabled (no second copy); otherwise a
  frozen copy of the initial policy.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .. import core
from ..errors import ConfigError
from ..run import checkpoint
from ..run.fsdp import full, shard_model, to_layout
from ..run.resumable import check_finished
from .config import ModelOptions
from .loading import (DTYPES, apply_finetune, ensure_pad_token, freeze, load_causal_lm, load_into, load_tokenizer,
                      read_run_config, token_logits)


def position_ids(mask: Tensor) -> Tensor:
    """``cumsum(mask) − 1`` (0 on left padding): a left-padded sequence gets the positions it would have
    unpadded (DETAILS LM-5)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model: nn.Module, ids: Tensor, mask: Tensor, keep_logits: int, hidden: bool = False):
    """One forward with explicit position ids; only the last ``keep_logits`` positions get logits
    (the vocabulary projection of prompt tokens is never computed). With ``hidden`` also the last hidden
    state at those positions — read as the input of the output projection by a hook, instead of asking for
    ``output_hidden_states``, which keeps every layer's ``[B, L, d]`` alive for backward."""
    captured: list[Tensor] = []
    handle = None
    if hidden:
        handle = model.get_output_embeddings().register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                    logits_to_keep=keep_logits)
    finally:
        if handle is not None:
            handle.remove()
    logits = token_logits(model, out.logits[:, -keep_logits:] if keep_logits else out.logits)  # the tokenizer's ids
    h = None
    if hidden:
        h = captured[-1]
        h = h[:, -keep_logits:] if keep_logits else h
    return logits, h


def _float32_linear(self: nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear.forward`` that, under autocast, runs in float32 (input, weight and bias cast up; the
    result float32) instead of autocast's half-precision matmul; unchanged outside autocast."""
    if not torch.is_autocast_enabled(x.device.type):
        return nn.Linear.forward(self, x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.linear(x.float(), self.weight.float(), bias)


def float32_head(model: nn.Module) -> nn.Module:
    """The output projection (LM head) of ``model`` computed in float32 under autocast, so that logits are
    never rounded to bf16/fp16 before the float32 log-softmax: every log-prob the sampler draws from, the
    ratios and the KL use carries float32 logits of the half-precision trunk's last hidden state (a bf16
    logit of magnitude 4–8 is rounded by up to 2⁻⁶–2⁻⁵, an error of that size in every log-prob; fp16 logits
    can also overflow). The standard practice of mixed-precision LM training (e.g. MiniMax-M1's float32 LM
    head for RL). Costs a float32 instead of a half ``[B, L, V]`` logits tensor and a float32 head matmul.

    Done by binding :func:`_float32_linear` as the head's ``forward`` (a bound method: ``copy.deepcopy`` of
    the model binds it to the copy's head); the parameters, their names and tied embeddings are untouched.
    Only a plain ``nn.Linear`` head is changed (any other is left as it is); idempotent. Returns ``model``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is nn.Linear and not getattr(head, "proxrl_float32", False):
        head.forward = types.MethodType(_float32_linear, head)
        head.proxrl_float32 = True
    return model


def log_probs_all(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  keep: Optional[Tensor] = None) -> Tensor:
    """``log_softmax(logits / T)`` over the vocabulary (half-precision logits are normalised in float32); with
    ``top_k``/``top_p`` of the truncated distribution the sampler draws from (:func:`proxrl.core.truncate_logits`,
    ``keep`` the scored tokens), −inf outside it."""
    x = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    x = x / temperature if temperature != 1.0 else x
    return torch.log_softmax(core.truncate_logits(x, top_k, top_p, keep), dim=-1)


#: positions per chunk of :func:`response_logp`: B × 16 × V floats of log-softmax at a time
LOGP_CHUNK = 16
#: logits up to this many elements (16 MiB of float32) take :func:`response_logp`'s direct path: one
#: log-softmax, no checkpointed chunks (whose recomputation and per-chunk calls cost more than the memory
#: they save on a small batch × vocabulary)
DIRECT_LOGP_ELEMENTS = 1 << 22


def response_logp(logits: Tensor, tokens: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  entropy: bool = False, entropy_grad: bool = False, chunk: int = LOGP_CHUNK):
    """Log-probs of ``tokens`` ``[B, L]`` under ``logits`` ``[B, L, V]`` at temperature T (top-k/top-p
    truncated, the scored token kept: :func:`log_probs_all`), and the entropy at each position (None unless
    ``entropy``; detached unless ``entropy_grad``), both in float32.

    Memory: the float32 log-softmax over the vocabulary is computed ``chunk`` positions at a time and, when a
    gradient is needed, each chunk runs under activation checkpointing — backward recomputes it from the
    logits — so no ``[B, L, V]`` float32 tensor exists besides the logits themselves (a plain log-softmax keeps
    one for backward, and its entropy a second). The values are those of the whole-tensor computation
    (log-softmax is row-wise)."""
    from torch.utils.checkpoint import checkpoint

    truncated = top_k > 0 or top_p < 1.0

    def piece(lg: Tensor, tok: Tensor, with_entropy: bool):
        lp = log_probs_all(lg, temperature, top_k, top_p, keep=tok)
        out = lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return out, out.new_zeros(())
        lp0 = lp.masked_fill(torch.isinf(lp), 0.0) if truncated else lp  # 0·log 0 = 0 outside the support
        return out, -(lp0.exp() * lp0).sum(-1)

    grad = torch.is_grad_enabled() and logits.requires_grad
    if logits.numel() <= DIRECT_LOGP_ELEMENTS:  # small: one pass, no recomputation (same values, row-wise)
        lp_all = log_probs_all(logits, temperature, top_k, top_p, keep=tokens)
        logp = lp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if not entropy:
            return logp, None
        with torch.set_grad_enabled(grad and entropy_grad):
            lp0 = lp_all if grad and entropy_grad else lp_all.detach()
            lp0 = lp0.masked_fill(torch.isinf(lp0), 0.0) if truncated else lp0
            return logp, -(lp0.exp() * lp0).sum(-1)
    logps, ents = [], []
    # split, not slicing: backward joins the chunks' gradients once (a slice's backward zero-fills a whole
    # [B, L, V] gradient for every chunk)
    for lg, tok in zip(logits.split(chunk, dim=1), tokens.split(chunk, dim=1)):
        if grad:
            lp, ent = checkpoint(piece, lg, tok, entropy and entropy_grad, use_reentrant=False)
            if entropy and not entropy_grad:
                with torch.no_grad():
                    ent = piece(lg.detach(), tok, True)[1]
        else:
            lp, ent = piece(lg, tok, entropy)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps, 1)
    return logp, (torch.cat(ents, 1) if entropy else None)


def token_logp(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` at ``tokens``: ``[B, T, V]``, ``[B, T]`` → ``[B, T]``."""
    return log_probs_all(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def last_real_index(mask: Tensor) -> Tensor:
    """Index of the last position with mask 1 in each row, whatever the padding side: ``[B]``."""
    L = mask.shape[-1]
    ar = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), ar, torch.full_like(ar, -1)).max(-1).values.clamp(min=0)


def master_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype trained weights, their optimizer state and the heads live in: float32 master copies of
    half-precision weights (bf16 weights stepped by Adam lose every update smaller than their 8-bit
    mantissa, DETAILS 21); float64 stays float64 (exactness tests)."""
    return torch.float64 if storage == torch.float64 else torch.float32


def to_master(model: nn.Module) -> nn.Module:
    """Trainable parameters of a half-precision model as float32 master weights; frozen ones keep their
    storage dtype (the memory saving of --dtype bfloat16)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return model


def autocast(device: str, amp: Optional[torch.dtype]):
    """``torch.autocast`` of the model forwards in ``amp`` (bf16 or fp16) on ``device``; a no-op when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp)


def grad_scaler(device: str, amp: Optional[torch.dtype]):
    """A :class:`torch.amp.GradScaler` for fp16 compute on ``device`` (its default initial scale 2¹⁶, ×2 every
    2000 steps without overflow, ×½ at an overflow); None for fp32 and bf16, whose gradients need no scaling."""
    if amp != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


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
        dtype = master_dtype(next(base.parameters()).dtype)
        self.amp, self.device_name = opts.amp, opts.device
        # top-k / top-p sampling (PPO's options; none for SFT/RM): log-probs are of the truncated distribution
        self.top_k, self.top_p = int(getattr(opts, "top_k", 0)), float(getattr(opts, "top_p", 1.0))
        freeze(float32_head(base))  # float32 logits under autocast (and in every copy below)
        self.is_lora = opts.finetune == "lora"
        # the reference: the base itself (adapter disabled) with LoRA, else a frozen copy (LM-14)
        self.ref_lm = None if self.is_lora else freeze(copy.deepcopy(base))
        critic_base = copy.deepcopy(base) if critic == "separate" else None
        self.lm = to_master(apply_finetune(base, opts))
        self.critic_lm = to_master(apply_finetune(critic_base, opts)) if critic_base is not None else None
        self.value_head = make_head(hidden_size(base), dtype)
        self.eval()

    def _fwd(self, model, ids: Tensor, mask: Tensor, keep: int, hidden: bool = False):
        with autocast(self.device_name, self.amp):
            return forward(model, ids, mask, keep, hidden=hidden)

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
        logits, h = self._fwd(self.lm, ids, mask, n_resp + 1, hidden=shared)
        resp = torch.nn.functional.pad(ids[:, -n_resp:], (0, 1))
        logp, ent = response_logp(logits, resp, temperature, self.top_k, self.top_p, entropy, entropy_grad)
        logp = logp[:, :-1]
        ent = ent[:, :-1] if ent is not None else None
        v = None
        if values:
            if h is None:
                _, h = self._fwd(self.critic_lm, ids, mask, n_resp + 1, hidden=True)
            v = self.value_head(h[:, -n_resp - 1:-1].to(self.dtype)).squeeze(-1)  # [B, R], head in float32
        return logp, v, ent

    def log_softmax(self, ids: Tensor, mask: Tensor, n_resp: int, temperature: float = 1.0) -> Tensor:
        """The policy's full ``log_softmax(logits / T)`` at each response position: ``[B, R, V]`` (for exact
        KLs; the training forward never materialises it twice)."""
        logits, _ = self._fwd(self.lm, ids, mask, n_resp + 1)
        return log_probs_all(logits[:, :-1], temperature)

    def ref_logp(self, ids: Tensor, mask: Tensor, n_resp: int, temperature: float = 1.0) -> Tensor:
        if self.is_lora:
            with self.lm.disable_adapter():
                logits, _ = self._fwd(self.lm, ids, mask, n_resp + 1)
        else:
            logits, _ = self._fwd(self.ref_lm, ids, mask, n_resp + 1)
        return token_logp(logits[:, :-1], ids[:, -n_resp:], temperature)

    def generator(self) -> nn.Module:
        return self.lm

    def trainable_state(self) -> dict[str, Tensor]:
        """Only what trains (LoRA adapters, or the trained weights) and the value head: the checkpoint. Full
        tensors also with ``--parallel fsdp`` (gathered from the shards: every rank must call it)."""
        return {name: full(p.detach()) for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, tensors: dict[str, Tensor]) -> None:
        """Load full tensors (a checkpoint, :meth:`trainable_state`); each rank keeps its shard under fsdp."""
        load_into(self, to_layout(self, tensors))

    def shard(self, dist) -> None:
        """``--parallel fsdp``: shard the policy LM, the reference copy and a separate critic LM over the ranks
        (:func:`proxrl.run.fsdp.shard_model`); the value head stays replicated. Before the optimizer is built."""
        for lm in (self.lm, self.ref_lm, self.critic_lm):
            if lm is not None:
                shard_model(lm, dist, self.device_name)


def build_policy(spec: str, opts: ModelOptions, critic: str = "head") -> LMPolicy:
    """The policy of ``spec`` with its critic and reference (the caller seeds: heads are initialised from
    the global torch RNG, :func:`proxrl.run.state.seed_everything`)."""
    dtype = DTYPES[opts.dtype]
    base = load_causal_lm(spec, dtype)
    tok = load_tokenizer(spec)
    ensure_pad_token(tok, base)
    return LMPolicy(base, tok, opts, critic).to(opts.device)


class RewardModel(nn.Module):
    """The LM trunk with a scalar head; the score is read at the last real token (DETAILS LM-4) and
    normalised with statistics measured after training: ``(r − score_mean) / score_std``."""

    def __init__(self, base: nn.Module, tokenizer, opts: ModelOptions):
        super().__init__()
        self.tokenizer = tokenizer
        self.opts = opts
        dtype = master_dtype(next(base.parameters()).dtype)
        self.amp, self.device_name = opts.amp, opts.device
        # top-k / top-p sampling (PPO's options; none for SFT/RM): log-probs are of the truncated distribution
        self.top_k, self.top_p = int(getattr(opts, "top_k", 0)), float(getattr(opts, "top_p", 1.0))
        freeze(float32_head(base))
        self.lm = to_master(apply_finetune(base, opts))
        self.head = make_head(hidden_size(base), dtype)
        self.register_buffer("score_mean", torch.zeros((), dtype=dtype))
        self.register_buffer("score_std", torch.ones((), dtype=dtype))
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def raw(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Unnormalised score ``[B]`` at the last real token (through ``__call__``: with ``--parallel fsdp`` the
        reward model is the sharded root, whose hooks gather its weights)."""
        return self(ids, mask, normalize=False)

    def _raw(self, ids: Tensor, mask: Tensor) -> Tensor:
        last = last_real_index(mask)  # [B]
        keep = int(mask.shape[1] - last.min())  # the window that holds every row's last real token (1 when left-padded)
        with autocast(self.device_name, self.amp):
            _, h = forward(self.lm, ids, mask, keep, hidden=True)
        h_last = h[torch.arange(h.shape[0], device=h.device), last - (mask.shape[1] - keep)]  # [B, d]
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1)  # the head in float32

    def forward(self, ids: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
        r = self._raw(ids, mask)
        return (r - self.score_mean) / self.score_std if normalize else r

    def trainable_state(self) -> dict[str, Tensor]:
        out = {n: full(p.detach()) for n, p in self.named_parameters() if p.requires_grad}
        out["score_mean"], out["score_std"] = self.score_mean, self.score_std
        return out


def build_reward_model(spec: str, opts: ModelOptions) -> RewardModel:
    dtype = DTYPES[opts.dtype]
    base = load_causal_lm(spec, dtype)
    tok = load_tokenizer(spec)
    ensure_pad_token(tok, base)
    return RewardModel(base, tok, opts).to(opts.device)


def load_reward_model(run_dir: str | Path, device: Optional[str] = None) -> RewardModel:
    """A trained reward model from an ``rlhf rm`` run directory (LoRA kept unmerged: it is only scored), on
    ``device`` (default: the device it was trained on, if this machine has it)."""
    from ..run.device import resolve_device

    run = read_run_config(run_dir)
    if run is None or run.get("stage") != "rm":
        raise ConfigError("reward", f"{run_dir} is not a reward-model run directory (no config.json with stage 'rm')")
    opts = ModelOptions(**{k: v for k, v in run["config"].items() if k in ModelOptions.__dataclass_fields__})
    opts.device = resolve_device(device or opts.device, "reward")
    rm = build_reward_model(run["base_model"], opts)
    tensors, state = checkpoint.load(Path(run_dir) / "checkpoints")
    check_finished(run_dir, state)  # stopped before its end: no score statistics yet; finished first (--resume)
    load_into(rm, tensors)
    freeze(rm)
    return rm


