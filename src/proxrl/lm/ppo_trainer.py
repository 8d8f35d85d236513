"""PPO for language models (RLHF stage 3), on the same core as the gym path.

One update, top to bottom (:meth:`PPOTrainer.generate` → :meth:`~PPOTrainer.score` → :meth:`~PPOTrainer.step`):

1. **generate** — sample a response to each prompt with the KV cache (``model.generate``), from the full
   distribution at temperature T; cut each response after its first stop token (LM-2).
2. **score** — the reward model or a Python function scores the *truncated* text; a response that never
   stopped loses ``missing_eos_penalty`` (the "EOS trick", LM-2).
3. **shape** — per-token reward = −β·kl_ref_k1 on every response token, plus the score on the last real
   response token (LM-3). ``kl_ref_k1`` = logp_old − logp_ref (k1: unbiased, the estimator in the reward);
   ``kl_ref`` logged = the mean over sequences of its sum (LM-8).
4. **advantages** — the token MDP as a :class:`~proxrl.batch.Batch` (EOS = terminated, length limit =
   truncated; the score is final, so nothing is bootstrapped after the last token) through
   :func:`proxrl.objective.estimate_advantages` with GAE, γ = 1, λ = 0.95 (LM-11) — the function the gym
   path calls; advantages whitened over the whole rollout batch (LM-10).
5. **optimise** — ``update_epochs`` × shuffled minibatches (one optimizer step each) × micro-batches
   (gradient accumulation, each micro loss weighted by its share of the minibatch's tokens or sequences so
   the micro-batch size never changes the result, LM-12), with :func:`proxrl.objective.surrogate_loss`
   (rung 6 clip or rung 5 KL penalty) and :func:`proxrl.core.value_loss` (clipped).
6. **control** — β ← Ziegler et al.'s adaptive controller on the measured ``kl_ref`` (LM-9); the rung-5
   penalty β (if used) ← ×2/÷2 once per update.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import random
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import checkpoint, core, objective
from ..optim import make_adam
from .. import state as state_mod
from ..batch import Batch
from ..errors import CheckpointError, ConfigError, NumericsError, ProxrlError
from .common import keep_freed_memory
from .config import PPOConfig
from .data import PPO_FIELDS, read_jsonl
from .model import (InverseCDFSampler, LMPolicy, RewardModel, build_policy, encode_prompt, last_real_index, left_pad,
                    load_reward_model, stop_token_ids, use_chat_template)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
MIN_WHITEN_TOKENS = 8


@dataclass
class Rollout:
    """Prompts and sampled responses, as token ids (never re-tokenised) and text."""

    prompts: list[str]
    query_ids: Tensor       # [B, P] left-padded
    query_mask: Tensor      # [B, P]
    response_ids: Tensor    # [B, R] right-padded, cut after the first stop token
    response_mask: Tensor   # [B, R] 1 up to and including the stop token
    stopped: Tensor         # [B] bool: the response ended with a stop token
    responses: list[str]    # decoded truncated responses (special tokens skipped)

    @property
    def ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], 1)  # [B, P+R]

    @property
    def mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], 1)

    def __len__(self) -> int:
        return len(self.prompts)


# --------------------------------------------------------------------------- pure pieces (tested alone)
def truncate_at_stop(response: Tensor, stop_ids: Sequence[int], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut ``[B, R]`` sampled tokens after the first stop token. Returns ``(ids, mask, stopped)``; tokens
    after the cut become ``pad_id`` and mask 0; the stop token itself is kept (mask 1)."""
    is_stop = torch.isin(response, torch.tensor(list(stop_ids), device=response.device))  # [B, R]
    stopped = is_stop.any(-1)
    R = response.shape[1]
    first = torch.where(stopped, is_stop.int().argmax(-1), torch.full_like(stopped, R - 1, dtype=torch.long))
    mask = (torch.arange(R, device=response.device)[None, :] <= first[:, None]).long()
    return torch.where(mask.bool(), response, torch.full_like(response, pad_id)), mask, stopped


def apply_missing_eos_penalty(scores: Tensor, stopped: Tensor, penalty: Optional[float]) -> Tensor:
    """score − penalty for responses that never stopped (LM-2); unchanged when ``penalty`` is None."""
    if penalty is None:
        return scores
    return torch.where(stopped, scores, scores - penalty)


def token_rewards(scores: Tensor, kl_ref_k1: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """−β·kl_ref_k1 on every real response token + the score on the last real one (LM-3): ``[B, R]``."""
    rewards = -kl_coef * kl_ref_k1 * mask
    last = last_real_index(mask)  # [B]
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards


def token_batch(response_ids: Tensor, mask: Tensor, stopped: Tensor, logp_old: Tensor, rewards: Tensor,
                values: Tensor, logp_ref: Optional[Tensor] = None) -> Batch:
    """The token MDP as the shared ``[B, T]`` schema: an episode is one response; it ends at its last real
    token, ``terminated`` when that is a stop token, ``truncated`` at the length limit. The score is final
    either way, so V after the last token is 0 (no bootstrap)."""
    m = mask.to(rewards.dtype)
    last = last_real_index(mask)
    rows = torch.arange(mask.shape[0])
    terminated = torch.zeros_like(m)
    truncated = torch.zeros_like(m)
    terminated[rows, last] = stopped.to(m.dtype)
    truncated[rows, last] = (~stopped).to(m.dtype)
    values = values * m
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # V(s_{t+1})
    next_values[rows, last] = 0.0
    return Batch(obs=None, actions=response_ids, logp_old=logp_old, rewards=rewards, terminated=terminated,
                 truncated=truncated, mask=m, values=values, next_values=next_values, logp_ref=logp_ref)


def micro_weight(micro_mask: Tensor, minibatch_mask: Tensor, agg: str) -> Tensor:
    """Share of a micro-batch in its minibatch's loss, so Σ_micro weight·loss_micro = loss_minibatch exactly
    for token-mean (share of real tokens) and seq-mean (share of non-empty sequences)."""
    if agg == "token-mean":
        return micro_mask.sum() / minibatch_mask.sum().clamp(min=1)
    return (micro_mask.sum(-1) > 0).sum() / (minibatch_mask.sum(-1) > 0).sum().clamp(min=1)


# --------------------------------------------------------------------------- rewards
def load_reward_fn(spec: str) -> RewardFn:
    """``module:function`` or ``path/to/file.py:function``: a callable (prompts, responses) → floats."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ConfigError("reward", f"{spec!r} is neither a reward-model directory nor 'module:function'")
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if spec_ is None or not Path(mod_name).is_file():
                raise ImportError(f"no file {mod_name}")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError("reward", f"cannot import {mod_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError("reward", f"{mod_name!r} has no callable {fn_name!r}")
    return fn


class Scorer:
    """Scores rollouts with a reward model (token ids reused when it shares the policy's tokenizer and
    prompt format) or a Python function of the decoded text."""

    def __init__(self, reward: str | RewardFn | RewardModel, policy: LMPolicy, chat: bool, max_prompt_length: int,
                 batch_size: int):
        self.fn: Optional[RewardFn] = None
        self.rm: Optional[RewardModel] = None
        if isinstance(reward, RewardModel):
            self.rm = reward
            self.name = "reward model"
        elif callable(reward):
            self.fn = reward
            self.name = f"reward function {getattr(reward, '__qualname__', type(reward).__name__)!r}"
        elif Path(reward).is_dir():
            self.rm = load_reward_model(reward)
            self.name = f"reward model {reward!r}"
        else:
            self.fn = load_reward_fn(reward)
            self.name = f"reward function {reward!r}"
        self.chunk = batch_size  # sequences per reward-model forward
        self.max_prompt_length = max_prompt_length
        if self.rm is not None:
            self.rm_chat = use_chat_template(self.rm.tokenizer, self.rm.opts.chat_template)
            self.same_tokens = (self.rm.tokenizer.get_vocab() == policy.tokenizer.get_vocab() and self.rm_chat == chat)

    def __call__(self, rollout: Rollout, where: str = "") -> Tensor:
        """Scores ``[B]`` (float64). NaN/inf is a one-line NumericsError naming the reward and ``where``."""
        scores = self._scores(rollout)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise NumericsError(f"{self.name} returned {scores[bad[0]].item()} for {len(bad)} of {len(scores)} "
                                f"responses{where} (first: response {bad[0]}, {rollout.responses[bad[0]][:40]!r})")
        return scores

    @torch.inference_mode()
    def _scores(self, rollout: Rollout) -> Tensor:
        if self.fn is not None:
            out = self.fn(list(rollout.prompts), list(rollout.responses))
            try:
                scores = torch.tensor([float(x) for x in out], dtype=torch.float64)
            except (TypeError, ValueError):
                raise ConfigError("reward", "the reward function must return a sequence of floats") from None
            if scores.shape != (len(rollout),):
                raise ConfigError("reward", f"the reward function returned {scores.numel()} values for {len(rollout)} responses")
            return scores
        rm = self.rm
        if self.same_tokens:
            ids, mask = rollout.ids, rollout.mask
        else:  # a different tokenizer: decode and re-encode (documented cost)
            tok = rm.tokenizer
            seqs = []
            for p, r, stop in zip(rollout.prompts, rollout.responses, rollout.stopped.tolist()):
                q = encode_prompt(tok, p, self.rm_chat, self.max_prompt_length)
                a = tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stop else [])
                seqs.append(q + a)
            ids, mask = left_pad(seqs, tok.pad_token_id)
        out = [rm(ids[i:i + self.chunk], mask[i:i + self.chunk]) for i in range(0, len(rollout), self.chunk)]
        return torch.cat(out).to(torch.float64)


# --------------------------------------------------------------------------- the trainer
class PPOTrainer:
    """Step-wise PPO for users who write their own loop::

        trainer = PPOTrainer(PPOConfig(policy=..., reward=...))
        for prompts in batches:
            rollout = trainer.generate(prompts)
            scores = trainer.score(rollout)      # or any [B] tensor you computed yourself
            metrics = trainer.step(rollout, scores)
    """

    def __init__(self, config: PPOConfig, policy: Optional[LMPolicy] = None,
                 reward: str | RewardFn | RewardModel | None = None):
        config.validate(need_policy=policy is None, need_reward=reward is None, need_prompts=False)
        keep_freed_memory()  # before the models are loaded (glibc heap instead of an mmap per large tensor)
        self.cfg = cfg = config
        self.policy = policy if policy is not None else build_policy(cfg.policy, cfg, cfg.critic)
        tok = self.policy.tokenizer
        self.pad_id = tok.pad_token_id
        self.stop_ids = stop_token_ids(tok, self.policy.lm)
        self.chat = use_chat_template(tok, cfg.chat_template)
        self.scorer = Scorer(reward if reward is not None else cfg.reward, self.policy, self.chat,
                             cfg.max_prompt_length, cfg.forward_batch_size)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_adam(params, lr=cfg.lr)
        self.kl_coef = cfg.kl_coef
        self.penalty_beta = cfg.penalty_beta
        self.step_count = 0
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self._where = ""  # position inside the update, for NumericsError messages
        self._encoded: dict[str, list[int]] = {}
        self._warned_negative_kl = False

    # ---- 1. generate
    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt token ids, tokenised once per distinct prompt and cached."""
        out = []
        for p in prompts:
            if p not in self._encoded:
                self._encoded[p] = encode_prompt(self.policy.tokenizer, p, self.chat, self.cfg.max_prompt_length)
            out.append(self._encoded[p])
        return out

    def generate(self, prompts: Sequence[str], seed: Optional[int] = None) -> Rollout:
        """Sample one response per prompt (KV cache; full distribution at the configured temperature).
        ``seed`` (default: derived from the config seed and the step) makes the sample reproducible."""
        from transformers import GenerationConfig, LogitsProcessorList

        cfg = self.cfg
        q_ids, q_mask = left_pad(self.encode(prompts), self.pad_id)
        dev = cfg.device
        # greedy decoding over InverseCDFSampler's one-hot logits = sampling at the temperature (LM-6)
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=cfg.response_length, eos_token_id=self.stop_ids,
                                   pad_token_id=self.pad_id, use_cache=True)
        torch.manual_seed(cfg.seed * 1_000_003 + self.step_count if seed is None else seed)
        with torch.inference_mode():
            out = self.policy.lm.generate(input_ids=q_ids.to(dev), attention_mask=q_mask.to(dev),
                                          generation_config=gen_cfg,
                                          logits_processor=LogitsProcessorList([InverseCDFSampler(cfg.temperature)]))
        resp = out[:, q_ids.shape[1]:].cpu().clone()  # [B, R'] R' ≤ response_length; clone: a normal tensor
        resp_ids, resp_mask, stopped = truncate_at_stop(resp, self.stop_ids, self.pad_id)
        tok = self.policy.tokenizer
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp_ids, resp_mask)]
        return Rollout(list(prompts), q_ids, q_mask, resp_ids, resp_mask, stopped, texts)

    # ---- 2. score
    def score(self, rollout: Rollout) -> Tensor:
        """Raw scores ``[B]`` of the truncated responses (reward model or function), before any penalty.
        NaN/inf scores raise a NumericsError naming the reward and the update (always, even with
        ``on_nonfinite='skip'``: a reward that returns NaN is a bug to fix, not a numerical accident)."""
        return self.scorer(rollout, f" at update {self.step_count + 1}")

    # ---- 3-6. shape, advantages, optimise, control
    @torch.inference_mode()
    def _rollout_forward(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask, R = rollout.ids.to(self.cfg.device), rollout.mask.to(self.cfg.device), rollout.response_ids.shape[1]
        T, mb = self.cfg.temperature, self.cfg.forward_batch_size
        logp, values, logp_ref = [], [], []
        for i in range(0, len(rollout), mb):
            lp, v, _ = self.policy(ids[i:i + mb], mask[i:i + mb], R, T, values=True, entropy=False)
            logp.append(lp)
            values.append(v)
            logp_ref.append(self.policy.ref_logp(ids[i:i + mb], mask[i:i + mb], R, T))
        return torch.cat(logp), torch.cat(values), torch.cat(logp_ref)

    def make_batch(self, rollout: Rollout, scores: Tensor) -> tuple[Batch, dict]:
        """Steps 3–4: old/reference log-probs and values, shaped rewards, GAE advantages. Returns the
        batch (``adv`` whitened per ``norm_adv``) and its statistics."""
        cfg = self.cfg
        # clone: inference-mode tensors cannot be saved for backward
        logp_old, values, logp_ref = (t.clone() for t in self._rollout_forward(rollout))
        dtype = logp_old.dtype
        mask = rollout.response_mask.to(dtype)
        scores_penalised = apply_missing_eos_penalty(scores.to(dtype), rollout.stopped, cfg.missing_eos_penalty)
        kl_ref_k1 = core.kl_k1(logp_old, logp_ref) * mask  # [B, R]
        rewards = token_rewards(scores_penalised, kl_ref_k1, mask, self.kl_coef)
        whitened = 0.0
        if cfg.whiten_rewards:
            if mask.sum() >= MIN_WHITEN_TOKENS:  # refuse on tiny batches rather than divide by ~0 (LM-10)
                rewards = core.masked_whiten(rewards, mask, shift_mean=False)
                whitened = 1.0
        batch = token_batch(rollout.response_ids, mask, rollout.stopped, logp_old, rewards, values, logp_ref)
        batch = objective.estimate_advantages(batch, "gae", cfg.gamma, cfg.gae_lambda)
        adv = objective.normalize_advantages(batch.adv, mask, cfg.norm_adv)
        batch = batch.replace(adv=adv)
        for name, x in (("log-probs of the sampled tokens", logp_old), ("reference log-probs", logp_ref),
                        ("values", values), ("rewards (score − β·kl_ref)", rewards), ("returns", batch.ret),
                        ("advantages", adv)):
            self._check_finite(name, x, mask)
        kl_seq = kl_ref_k1.sum(-1)  # [B] per-sequence KL to the reference (k1)
        stats = {
            "reward_mean": scores.double().mean().item(),
            "score_mean": scores_penalised.double().mean().item(),
            "kl_ref": kl_seq.mean().item(),
            "kl_ref_k1": core.masked_mean(kl_ref_k1, mask).item(),
            "kl_ref_k3": (core.kl_k3(logp_old, logp_ref) * mask).sum(-1).mean().item(),
            "response_length": mask.sum(-1).mean().item(),
            "eos_rate": rollout.stopped.double().mean().item(),
            "rewards_whitened": whitened,
        }
        if stats["kl_ref_k1"] < -0.01 and not self._warned_negative_kl:
            warnings.warn(f"mean k1 KL to the reference is negative ({stats['kl_ref_k1']:.4f}): the sampler and "
                          "the scored policy disagree (temperature? sampling filters?)", stacklevel=2)
            self._warned_negative_kl = True
        return batch, stats

    def accumulate(self, batch: Batch, ids: Tensor, mask: Tensor, rows: Tensor) -> dict[str, float]:
        """Backward of one minibatch ``rows``, micro-batch by micro-batch (no optimizer step)."""
        cfg = self.cfg
        R = batch.shape[1]
        mb_mask = batch.mask[rows]
        sums: dict[str, float] = {}
        for micro in rows.split(cfg.micro_batch_size):
            m = batch.mask[micro]
            w = micro_weight(m, mb_mask, cfg.loss_agg)
            logp, v, ent = self.policy(ids[micro], mask[micro], R, cfg.temperature, values=True,
                                       entropy=True, entropy_grad=cfg.ent_coef > 0)
            pg_loss, st = objective.surrogate_loss(cfg.surrogate, logp, batch.logp_old[micro], batch.adv[micro], m,
                                                   clip_coef=cfg.clip_coef, beta=self.penalty_beta, agg=cfg.loss_agg)
            v_loss = core.value_loss(v, batch.ret[micro], batch.values[micro], cfg.vf_clip, m, cfg.loss_agg)
            ent_mean = core.aggregate(ent, m, cfg.loss_agg)
            loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent_mean
            for name, x in (("policy loss", pg_loss), ("value loss", v_loss), ("entropy", ent_mean)):
                self._check_finite(name, x.detach())
            (loss * w).backward()
            wf = float(w)
            for k, val in {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": ent_mean, **st}.items():
                if k == "ratio_max":
                    sums[k] = max(sums.get(k, 0.0), float(val.detach()))
                else:
                    sums[k] = sums.get(k, 0.0) + wf * float(val.detach())
        return sums

    def _check_finite(self, name: str, x: Tensor, mask: Optional[Tensor] = None) -> None:
        """NaN/inf in ``x`` (over ``mask``) → NumericsError naming the quantity and the update (LM-16)."""
        vals = x[mask.bool()] if mask is not None else x
        if not torch.isfinite(vals).all():
            kind = "NaN" if torch.isnan(vals).any() else "inf"
            raise NumericsError(f"{name}: {kind} at update {self.step_count + 1}{self._where}")

    def step(self, rollout: Rollout, scores: Tensor) -> dict[str, float]:
        """One PPO update on a scored rollout; returns its metrics.

        NaN/inf in the rewards, advantages, losses, gradient norm or updated weights raises a NumericsError
        naming the quantity and the update (``on_nonfinite='stop'``, the default: nothing is saved, so the
        last good checkpoint is intact). With ``on_nonfinite='skip'`` the weights and optimizer are put back
        as they were before the update, the update counts, and its metrics line says ``skipped`` (also
        printed on stderr) — never silently."""
        backup = None
        if self.cfg.on_nonfinite == "skip":
            backup = ({k: v.clone() for k, v in self.policy.trainable_state().items()},
                      copy.deepcopy(self.optimizer.state_dict()), self.penalty_beta, self.kl_coef)
        try:
            return self._step(rollout, scores)
        except NumericsError as e:
            if backup is None:
                raise
            self.policy.load_trainable(backup[0])
            self.optimizer.load_state_dict(backup[1])
            self.penalty_beta, self.kl_coef = backup[2], backup[3]
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            print(f"warning: update {self.step_count} skipped: {e}", file=sys.stderr)
            return {"step": self.step_count, "beta": self.kl_coef, "beta_next": self.kl_coef,
                    "penalty_beta": self.penalty_beta, "skipped": str(e), "update_time": 0.0}
        finally:
            self._where = ""

    def _step(self, rollout: Rollout, scores: Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg = self.cfg
        batch, stats = self.make_batch(rollout, scores)
        t_forward = time.perf_counter() - t0
        ids, mask = rollout.ids.to(cfg.device), rollout.mask.to(cfg.device)
        B = len(rollout)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        totals: dict[str, float] = {}
        n_mb = 0
        for epoch in range(cfg.update_epochs):
            perm = torch.randperm(B, generator=self.shuffle)
            for j, rows in enumerate(perm.split(cfg.minibatch_size)):
                self._where = f" (epoch {epoch + 1}, minibatch {j + 1})"
                self.optimizer.zero_grad(set_to_none=True)
                sums = self.accumulate(batch, ids, mask, rows)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self._check_finite("gradient norm", grad_norm)
                self.optimizer.step()
                n_mb += 1
                sums["grad_norm"] = float(grad_norm)
                for k, v in sums.items():
                    totals[k] = max(totals.get(k, 0.0), v) if k == "ratio_max" else totals.get(k, 0.0) + v
        self._where = ""
        for name, p in self.policy.named_parameters():
            if p.requires_grad:
                self._check_finite(f"weight {name} after the optimizer step", p.detach())
        metrics = {k: (v if k == "ratio_max" else v / max(n_mb, 1)) for k, v in totals.items()}
        if cfg.surrogate == "kl-penalty":
            self.penalty_beta = core.ppo_beta_update(self.penalty_beta, metrics["approx_kl"], cfg.penalty_target_kl)
        metrics.setdefault("clip_fraction", 0.0)
        beta_used = self.kl_coef
        if cfg.adaptive_kl:
            self.kl_coef = core.ziegler_beta_update(self.kl_coef, stats["kl_ref"], cfg.target_kl_ref, B, cfg.kl_horizon)
        self.step_count += 1
        ev = float(core.explained_variance(batch.values, batch.ret, batch.mask))
        dt = time.perf_counter() - t0
        return {"step": self.step_count, **stats, "beta": beta_used, "beta_next": self.kl_coef,
                "penalty_beta": self.penalty_beta, **metrics,
                "explained_variance": ev if math.isfinite(ev) else None,  # None: the returns have no variance
                "skipped": None, "update_time": dt, "forward_time": t_forward, "train_time": dt - t_forward}

    # ---- evaluation and state
    def evaluate(self, prompts: Sequence[str], seed: int = 12345) -> dict:
        """Mean raw score and KL to the reference on ``prompts`` with a fixed sampling seed (the same
        before and after training), plus the responses."""
        if not prompts:
            return {"reward_mean": float("nan"), "kl_ref": float("nan"), "eos_rate": float("nan"), "responses": []}
        rollout = self.generate(prompts, seed=seed)
        scores = self.scorer(rollout, " on the held-out prompts")
        logp, _, logp_ref = self._rollout_forward(rollout)
        kl = ((logp - logp_ref) * rollout.response_mask).sum(-1)
        return {"reward_mean": scores.mean().item(), "kl_ref": kl.mean().item(),
                "eos_rate": rollout.stopped.double().mean().item(),
                "responses": [{"prompt": p, "response": r, "reward": float(s)}
                              for p, r, s in zip(rollout.prompts, rollout.responses, scores.tolist())]}

    def state(self) -> dict:
        return {"step": self.step_count, "kl_coef": self.kl_coef, "penalty_beta": self.penalty_beta}

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything of the trainer that decides the rest of a run: trainable weights (``policy.*``: LoRA
        adapters or trained weights, value head), Adam state (``optimizer/*`` + JSON param groups — the
        learning rate is constant, so they are the whole schedule), the minibatch/prompt shuffle generator
        (``rng/shuffle``), both β and the update counter. The sampling seed of update u is derived from
        ``seed`` and u, so nothing more is needed for generation."""
        tensors = {f"policy.{k}": v for k, v in self.policy.trainable_state().items()}
        opt_t, opt_meta = state_mod.optimizer_state(self.optimizer, "optimizer")
        tensors.update(opt_t)
        tensors["rng/shuffle"] = self.shuffle.get_state()
        return tensors, {**self.state(), "optimizer": opt_meta, "warned_negative_kl": self._warned_negative_kl}

    def load_checkpoint_state(self, tensors: dict[str, Tensor], state: dict) -> None:
        """Inverse of :meth:`checkpoint_state` (the trainer must be built from the same config)."""
        own = {k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")}
        expected = set(self.policy.trainable_state())
        if set(own) != expected:
            missing = sorted(expected - set(own))[:3] or sorted(set(own) - expected)[:3]
            raise CheckpointError(f"checkpoint weights do not fit the policy (e.g. {missing})")
        self.policy.load_trainable(own)
        state_mod.load_optimizer_state(self.optimizer, "optimizer", tensors, state["optimizer"])
        self.shuffle.set_state(tensors["rng/shuffle"])
        self.step_count = int(state["step"])
        self.kl_coef = float(state["kl_coef"])
        self.penalty_beta = float(state["penalty_beta"])
        self._warned_negative_kl = bool(state.get("warned_negative_kl", False))


# --------------------------------------------------------------------------- the whole stage
def run_dir_config(stage: str, base_model: str, cfg) -> dict:
    base = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
    return {"stage": stage, "base_model": base, "config": asdict(cfg)}


class RunWriter:
    """``config.json`` (atomic), ``metrics.jsonl`` (one fsynced line per update) and ``samples.md``."""

    def __init__(self, out: str | Path, config_obj: Optional[dict]):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.samples_path = self.out / "samples.md"
        if config_obj is None:  # reopened by resume()
            return
        checkpoint.write_json_atomic(self.out / "config.json", config_obj)
        self.metrics_path.write_text("")
        self.samples_path.write_text("# Sample responses\n")

    @classmethod
    def resume(cls, out: str | Path, step: int, samples_bytes: Optional[int]) -> "RunWriter":
        """Reopen a run's files, cut back to what they held at the checkpoint of update ``step``: metrics
        lines of later updates (and a line cut by a kill) are dropped, ``samples.md`` is truncated."""
        w = cls(out, None)
        rows = []
        if w.metrics_path.is_file():
            for raw in w.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(raw)
                except ValueError:
                    break
                if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] > step:
                    break
                rows.append(raw + "\n")
        tmp = w.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(rows))
        os.replace(tmp, w.metrics_path)
        if samples_bytes is not None and w.samples_path.is_file() and w.samples_path.stat().st_size > samples_bytes:
            with open(w.samples_path, "r+b") as f:
                f.truncate(samples_bytes)
        return w

    def metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def samples(self, title: str, items: list[tuple[str, str, float]]) -> int:
        """Append a section; returns the file's size afterwards (fsynced: a checkpoint records it)."""
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(f"\n## {title}\n")
            for prompt, response, reward in items:
                f.write(f"\n**prompt:** {prompt.strip()}\n\n**response** (reward {reward:+.3f}): {response.strip()}\n")
            f.flush()
            os.fsync(f.fileno())
            return f.tell()


def split_prompts(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    shuffled = [prompts[i] for i in order]
    n_eval = min(n_eval, max(len(prompts) - 1, 0))
    return shuffled[n_eval:], shuffled[:n_eval]


class PPOInterrupted(ProxrlError):
    """SIGINT/SIGTERM: the update in progress was finished and checkpointed; ``exit_code`` is 130/143."""

    def __init__(self, signum: int, run_dir: Path, update: int):
        import signal

        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after update {update}; checkpoint written; "
                         f"resume with: proxrl rlhf ppo --resume {run_dir}")


def _prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def resolve_resume(config: PPOConfig) -> tuple[PPOConfig, dict, dict]:
    """The saved config of the run in ``config.resume`` (with ``out`` = that directory) and its latest
    checkpoint. Raises a one-line CheckpointError if there is none or it is not a PPO run checkpoint."""
    run_dir = Path(config.resume)
    tensors, state = checkpoint.load(run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir)
    saved = state.get("config")
    if state.get("stage") != "ppo" or not isinstance(saved, dict) or "run" not in state:
        raise CheckpointError(f"{run_dir}: not a resumable proxrl PPO checkpoint (written by an older version "
                              "or another stage)")
    fields = PPOConfig.__dataclass_fields__
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise CheckpointError(f"{run_dir}: checkpoint config has unknown fields {unknown[:3]}")
    cfg = PPOConfig(**{**saved, "resume": None, "out": str(run_dir)})
    return cfg, tensors, state


def ppo(config: PPOConfig, reward: str | RewardFn | RewardModel | None = None, log: Callable[[str], None] = print,
        policy: Optional[LMPolicy] = None) -> dict:
    """Train with PPO; writes everything to ``config.out``; returns the summary (also ``summary.json``).

    A full checkpoint (see :meth:`PPOTrainer.checkpoint_state`, plus the global torch/numpy/Python RNGs,
    the prompt cursor and shuffle order, the held-out "before" evaluation and the elapsed time) is written
    every ``checkpoint_every`` updates, at the end, and on SIGINT/SIGTERM (after the update in progress;
    then :class:`PPOInterrupted`, exit 130/143 from the CLI). ``config.resume = DIR`` continues that run
    from its latest checkpoint with its saved config: the result is bit-identical (CPU) to the run never
    interrupted — metrics lines apart from wall-clock fields, and every checkpointed tensor. When resuming
    a run whose reward was a Python callable, pass the same callable again as ``reward``."""
    resumed = None
    if config.resume:
        config, ckpt_tensors, ckpt_state = resolve_resume(config)
        resumed = (ckpt_tensors, ckpt_state)
        policy = None
    cfg = config
    if reward is not None and not isinstance(reward, str):
        cfg.reward = cfg.reward or getattr(reward, "__qualname__", "python-function")
    cfg.validate()
    from ..trainer import _StopSignals

    random.seed(cfg.seed)  # a reward function may draw from these: seeded, checkpointed, restored
    import numpy as np
    np.random.seed(cfg.seed % 2 ** 32)
    records = read_jsonl(cfg.prompts, PPO_FIELDS)
    train_prompts, eval_prompts = split_prompts([r["prompt"] for r in records], cfg.eval_prompts, cfg.seed)
    digest = _prompts_digest(train_prompts + ["\0"] + eval_prompts)
    trainer = PPOTrainer(cfg, policy=policy, reward=reward)
    out = Path(cfg.out)
    cursor, order = 0, []
    if resumed is None:
        elapsed0 = 0.0
        writer = RunWriter(out, run_dir_config("ppo", cfg.policy, cfg))
        before = trainer.evaluate(eval_prompts)
        writer.samples("before training (held-out prompts)", [(r["prompt"], r["response"], r["reward"]) for r in before["responses"]])
        log(f"ppo: {len(train_prompts)} train / {len(eval_prompts)} held-out prompts; held-out reward before "
            f"{before['reward_mean']:+.4f}")
    else:
        tensors, st = resumed
        run = st["run"]
        if run.get("prompts_sha256") != digest:
            raise CheckpointError(f"{out}: the prompts in {cfg.prompts} changed since the checkpoint; an exact "
                                  "resume needs the same prompts file")
        try:
            trainer.load_checkpoint_state(tensors, st)
            state_mod.set_rng_state(tensors, run["rng"])
            cursor, order, before, elapsed0 = int(run["cursor"]), [int(i) for i in run["order"]], run["before"], float(run["elapsed"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{out}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
        writer = RunWriter.resume(out, trainer.step_count, run.get("samples_bytes"))
        log(f"ppo: resuming {out} after update {trainer.step_count}/{cfg.updates}")
    t_start = time.perf_counter() - elapsed0
    samples_bytes = writer.samples_path.stat().st_size if writer.samples_path.is_file() else None

    def save() -> Path:
        tensors, st = trainer.checkpoint_state()
        rng_t, rng_meta = state_mod.rng_state()
        tensors.update(rng_t)
        st.update(stage="ppo", config=asdict(cfg), run={
            "cursor": cursor, "order": order, "before": before, "elapsed": time.perf_counter() - t_start,
            "samples_bytes": samples_bytes, "rng": rng_meta, "prompts_sha256": digest})
        return checkpoint.save(out / "checkpoints", trainer.step_count, tensors, st, keep=cfg.keep_checkpoints)

    with _StopSignals() as stop:
        for update in range(trainer.step_count + 1, cfg.updates + 1):
            t0 = time.perf_counter()
            batch_prompts = []
            while len(batch_prompts) < cfg.batch_size:  # epochs over the prompts, a fresh shuffle each
                if cursor >= len(order):
                    order = torch.randperm(len(train_prompts), generator=trainer.shuffle).tolist()
                    cursor = 0
                batch_prompts.append(train_prompts[order[cursor]])
                cursor += 1
            rollout = trainer.generate(batch_prompts)
            t_gen = time.perf_counter() - t0
            scores = trainer.score(rollout)
            t_score = time.perf_counter() - t0 - t_gen
            m = trainer.step(rollout, scores)
            dt = time.perf_counter() - t0
            m["generate_time"], m["score_time"] = t_gen, t_score
            m["tokens_per_s"] = float(rollout.response_mask.sum()) / dt
            m["time"] = time.perf_counter() - t_start
            for k, v in m.items():
                if isinstance(v, float) and not math.isfinite(v):
                    if m["skipped"] is None:
                        raise NumericsError(f"metric {k}: {v} at update {m['step']}")
                    m[k] = None
            writer.metrics(m)
            samples_bytes = writer.samples(
                f"update {m['step']}" + (" (skipped)" if m["skipped"] else ""),
                [(rollout.prompts[i], rollout.responses[i], float(scores[i]))
                 for i in range(min(cfg.samples_per_update, len(rollout)))])
            if m["skipped"]:
                log(f"update {m['step']:>3}/{cfg.updates}  SKIPPED: {m['skipped']}")
            else:
                log(f"update {m['step']:>3}/{cfg.updates}  reward {m['reward_mean']:+.4f}  kl_ref {m['kl_ref']:.3f}  "
                    f"beta {m['beta']:.4f}  approx_kl {m['approx_kl']:.4f}  clip {m['clip_fraction']:.3f}  "
                    f"len {m['response_length']:.1f}  eos {m['eos_rate']:.2f}  {dt:.1f}s")
            last = update == cfg.updates
            if last or stop.signum is not None or (cfg.checkpoint_every and update % cfg.checkpoint_every == 0):
                save()
            if stop.signum is not None and not last:
                raise PPOInterrupted(stop.signum, out, update)
    after = trainer.evaluate(eval_prompts)
    writer.samples("after training (held-out prompts)", [(r["prompt"], r["response"], r["reward"]) for r in after["responses"]])
    summary = {"reward_before": before["reward_mean"], "reward_after": after["reward_mean"],
               "kl_ref": after["kl_ref"], "kl_ref_before": before["kl_ref"], "eos_rate_before": before["eos_rate"],
               "eos_rate_after": after["eos_rate"], "updates": cfg.updates,
               "wall_time": time.perf_counter() - t_start,
               "before": before["responses"], "after": after["responses"]}
    checkpoint.write_json_atomic(out / "summary.json", summary)
    log(f"ppo: held-out reward {before['reward_mean']:+.4f} → {after['reward_mean']:+.4f}, kl_ref {after['kl_ref']:.3f}, "
        f"{summary['wall_time']:.0f}s")
    return summary
