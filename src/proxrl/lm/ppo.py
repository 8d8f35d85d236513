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

import importlib
import math
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
from ..batch import Batch
from ..errors import ConfigError, NumericsError
from .config import PPOConfig
from .data import PPO_FIELDS, read_jsonl
from .model import (LMPolicy, RewardModel, build_policy, encode_prompt, last_real_index, left_pad,
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
                 micro_batch_size: int):
        self.fn: Optional[RewardFn] = None
        self.rm: Optional[RewardModel] = None
        if isinstance(reward, RewardModel):
            self.rm = reward
        elif callable(reward):
            self.fn = reward
        elif Path(reward).is_dir():
            self.rm = load_reward_model(reward)
        else:
            self.fn = load_reward_fn(reward)
        self.micro = micro_batch_size
        self.max_prompt_length = max_prompt_length
        if self.rm is not None:
            self.rm_chat = use_chat_template(self.rm.tokenizer, self.rm.opts.chat_template)
            self.same_tokens = (self.rm.tokenizer.get_vocab() == policy.tokenizer.get_vocab() and self.rm_chat == chat)

    @torch.inference_mode()
    def __call__(self, rollout: Rollout) -> Tensor:
        if self.fn is not None:
            out = self.fn(list(rollout.prompts), list(rollout.responses))
            try:
                scores = torch.tensor([float(x) for x in out], dtype=torch.float64)
            except (TypeError, ValueError):
                raise ConfigError("reward", "the reward function must return a sequence of floats") from None
            if scores.shape != (len(rollout),):
                raise ConfigError("reward", f"the reward function returned {scores.numel()} values for {len(rollout)} responses")
            if not torch.isfinite(scores).all():
                raise NumericsError("reward: the reward function returned NaN or inf")
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
        out = [rm(ids[i:i + self.micro], mask[i:i + self.micro]) for i in range(0, len(rollout), self.micro)]
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
        config.validate() if (policy is None or reward is None) else None
        self.cfg = cfg = config
        self.policy = policy if policy is not None else build_policy(cfg.policy, cfg, cfg.critic)
        tok = self.policy.tokenizer
        self.pad_id = tok.pad_token_id
        self.stop_ids = stop_token_ids(tok, self.policy.lm)
        self.chat = use_chat_template(tok, cfg.chat_template)
        self.scorer = Scorer(reward if reward is not None else cfg.reward, self.policy, self.chat,
                             cfg.max_prompt_length, cfg.micro_batch_size)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        self.kl_coef = cfg.kl_coef
        self.penalty_beta = cfg.penalty_beta
        self.step_count = 0
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
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
        from transformers import GenerationConfig

        cfg = self.cfg
        q_ids, q_mask = left_pad(self.encode(prompts), self.pad_id)
        dev = cfg.device
        gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=cfg.response_length, eos_token_id=self.stop_ids,
                                   pad_token_id=self.pad_id, use_cache=True)
        torch.manual_seed(cfg.seed * 1_000_003 + self.step_count if seed is None else seed)
        with torch.inference_mode():
            out = self.policy.lm.generate(input_ids=q_ids.to(dev), attention_mask=q_mask.to(dev),
                                          generation_config=gen_cfg)
        resp = out[:, q_ids.shape[1]:].cpu().clone()  # [B, R'] R' ≤ response_length; clone: a normal tensor
        resp_ids, resp_mask, stopped = truncate_at_stop(resp, self.stop_ids, self.pad_id)
        tok = self.policy.tokenizer
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp_ids, resp_mask)]
        return Rollout(list(prompts), q_ids, q_mask, resp_ids, resp_mask, stopped, texts)

    # ---- 2. score
    def score(self, rollout: Rollout) -> Tensor:
        """Raw scores ``[B]`` of the truncated responses (reward model or function), before any penalty."""
        return self.scorer(rollout)

    # ---- 3-6. shape, advantages, optimise, control
    @torch.inference_mode()
    def _rollout_forward(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask, R = rollout.ids.to(self.cfg.device), rollout.mask.to(self.cfg.device), rollout.response_ids.shape[1]
        T, mb = self.cfg.temperature, self.cfg.micro_batch_size
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
            (loss * w).backward()
            wf = float(w)
            for k, val in {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": ent_mean, **st}.items():
                if k == "ratio_max":
                    sums[k] = max(sums.get(k, 0.0), float(val.detach()))
                else:
                    sums[k] = sums.get(k, 0.0) + wf * float(val.detach())
        return sums

    def step(self, rollout: Rollout, scores: Tensor) -> dict[str, float]:
        """One PPO update on a scored rollout; returns its metrics."""
        t0 = time.perf_counter()
        cfg = self.cfg
        batch, stats = self.make_batch(rollout, scores)
        ids, mask = rollout.ids.to(cfg.device), rollout.mask.to(cfg.device)
        B = len(rollout)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        totals: dict[str, float] = {}
        n_mb, skipped = 0, 0
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(B, generator=self.shuffle)
            for rows in perm.split(cfg.minibatch_size):
                self.optimizer.zero_grad(set_to_none=True)
                sums = self.accumulate(batch, ids, mask, rows)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):  # LM-16: never silently: counted in the metrics
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.optimizer.step()
                n_mb += 1
                sums["grad_norm"] = float(grad_norm)
                for k, v in sums.items():
                    totals[k] = max(totals.get(k, 0.0), v) if k == "ratio_max" else totals.get(k, 0.0) + v
        metrics = {k: (v if k == "ratio_max" else v / max(n_mb, 1)) for k, v in totals.items()}
        if cfg.surrogate == "kl-penalty":
            self.penalty_beta = core.ppo_beta_update(self.penalty_beta, metrics["approx_kl"], cfg.penalty_target_kl)
        metrics.setdefault("clip_fraction", 0.0)
        beta_used = self.kl_coef
        if cfg.adaptive_kl:
            self.kl_coef = core.ziegler_beta_update(self.kl_coef, stats["kl_ref"], cfg.target_kl_ref, B, cfg.kl_horizon)
        self.step_count += 1
        ev = core.explained_variance(batch.values, batch.ret, batch.mask)
        dt = time.perf_counter() - t0
        return {"step": self.step_count, **stats, "beta": beta_used, "beta_next": self.kl_coef,
                "penalty_beta": self.penalty_beta, **metrics, "explained_variance": float(ev),
                "skipped_steps": skipped, "update_time": dt}

    # ---- evaluation and state
    def evaluate(self, prompts: Sequence[str], seed: int = 12345) -> dict:
        """Mean raw score and KL to the reference on ``prompts`` with a fixed sampling seed (the same
        before and after training), plus the responses."""
        if not prompts:
            return {"reward_mean": float("nan"), "kl_ref": float("nan"), "responses": []}
        rollout = self.generate(prompts, seed=seed)
        scores = self.score(rollout)
        logp, _, logp_ref = self._rollout_forward(rollout)
        kl = ((logp - logp_ref) * rollout.response_mask).sum(-1)
        return {"reward_mean": scores.mean().item(), "kl_ref": kl.mean().item(),
                "eos_rate": rollout.stopped.double().mean().item(),
                "responses": [{"prompt": p, "response": r, "reward": float(s)}
                              for p, r, s in zip(rollout.prompts, rollout.responses, scores.tolist())]}

    def state(self) -> dict:
        return {"step": self.step_count, "kl_coef": self.kl_coef, "penalty_beta": self.penalty_beta}


# --------------------------------------------------------------------------- the whole stage
def run_dir_config(stage: str, base_model: str, cfg) -> dict:
    base = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
    return {"stage": stage, "base_model": base, "config": asdict(cfg)}


class RunWriter:
    """``config.json`` (atomic), ``metrics.jsonl`` (one fsynced line per update) and ``samples.md``."""

    def __init__(self, out: str | Path, config_obj: dict):
        import json

        self._json = json
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(self.out / "config.json", config_obj)
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.samples_path = self.out / "samples.md"
        self.samples_path.write_text("# Sample responses\n")

    def metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(self._json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def samples(self, title: str, items: list[tuple[str, str, float]]) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(f"\n## {title}\n")
            for prompt, response, reward in items:
                f.write(f"\n**prompt:** {prompt.strip()}\n\n**response** (reward {reward:+.3f}): {response.strip()}\n")


def split_prompts(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    shuffled = [prompts[i] for i in order]
    n_eval = min(n_eval, max(len(prompts) - 1, 0))
    return shuffled[n_eval:], shuffled[:n_eval]


def ppo(config: PPOConfig, reward: str | RewardFn | RewardModel | None = None, log: Callable[[str], None] = print,
        policy: Optional[LMPolicy] = None) -> dict:
    """Train with PPO; writes everything to ``config.out``; returns the summary (also ``summary.json``)."""
    cfg = config
    if reward is not None and not isinstance(reward, str):
        cfg.reward = cfg.reward or getattr(reward, "__qualname__", "python-function")
    cfg.validate()
    t_start = time.perf_counter()
    records = read_jsonl(cfg.prompts, PPO_FIELDS)
    train_prompts, eval_prompts = split_prompts([r["prompt"] for r in records], cfg.eval_prompts, cfg.seed)
    trainer = PPOTrainer(cfg, policy=policy, reward=reward)
    writer = RunWriter(cfg.out, run_dir_config("ppo", cfg.policy, cfg))
    before = trainer.evaluate(eval_prompts)
    writer.samples("before training (held-out prompts)", [(r["prompt"], r["response"], r["reward"]) for r in before["responses"]])
    log(f"ppo: {len(train_prompts)} train / {len(eval_prompts)} held-out prompts; held-out reward before "
        f"{before['reward_mean']:+.4f}")
    cursor, order = 0, []
    for update in range(cfg.updates):
        t0 = time.perf_counter()
        batch_prompts = []
        while len(batch_prompts) < cfg.batch_size:  # epochs over the prompts, a fresh shuffle each
            if cursor >= len(order):
                order = torch.randperm(len(train_prompts), generator=trainer.shuffle).tolist()
                cursor = 0
            batch_prompts.append(train_prompts[order[cursor]])
            cursor += 1
        rollout = trainer.generate(batch_prompts)
        scores = trainer.score(rollout)
        m = trainer.step(rollout, scores)
        dt = time.perf_counter() - t0
        m["tokens_per_s"] = float(rollout.response_mask.sum()) / dt
        m["time"] = time.perf_counter() - t_start
        for k, v in m.items():
            if isinstance(v, float) and not math.isfinite(v) and k != "explained_variance":
                raise NumericsError(f"{k}: {v} at update {m['step']}")
        writer.metrics(m)
        writer.samples(f"update {m['step']}", [(rollout.prompts[i], rollout.responses[i], float(scores[i]))
                                               for i in range(min(cfg.samples_per_update, len(rollout)))])
        log(f"update {m['step']:>3}/{cfg.updates}  reward {m['reward_mean']:+.4f}  kl_ref {m['kl_ref']:.3f}  "
            f"beta {m['beta']:.4f}  approx_kl {m['approx_kl']:.4f}  clip {m['clip_fraction']:.3f}  "
            f"len {m['response_length']:.1f}  eos {m['eos_rate']:.2f}  {dt:.1f}s")
        if cfg.save_every and m["step"] % cfg.save_every == 0 and m["step"] < cfg.updates:
            save_policy(cfg.out, trainer)
    save_policy(cfg.out, trainer)
    after = trainer.evaluate(eval_prompts)
    writer.samples("after training (held-out prompts)", [(r["prompt"], r["response"], r["reward"]) for r in after["responses"]])
    summary = {"reward_before": before["reward_mean"], "reward_after": after["reward_mean"],
               "kl_ref": after["kl_ref"], "kl_ref_before": before["kl_ref"], "eos_rate_before": before["eos_rate"],
               "eos_rate_after": after["eos_rate"], "updates": cfg.updates,
               "wall_time": time.perf_counter() - t_start,
               "before": before["responses"], "after": after["responses"]}
    checkpoint.write_json_atomic(Path(cfg.out) / "summary.json", summary)
    log(f"ppo: held-out reward {before['reward_mean']:+.4f} → {after['reward_mean']:+.4f}, kl_ref {after['kl_ref']:.3f}, "
        f"{summary['wall_time']:.0f}s")
    return summary


def save_policy(out: str | Path, trainer: PPOTrainer) -> Path:
    tensors = {f"policy.{k}": v for k, v in trainer.policy.trainable_state().items()}
    return checkpoint.save(Path(out) / "checkpoints", trainer.step_count, tensors, {"stage": "ppo", **trainer.state()})
