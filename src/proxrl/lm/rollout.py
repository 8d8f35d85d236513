"""What produces a :class:`~proxrl.batch.Batch` from prompts: sampling, scoring, the no-grad forwards
and the reward shaping, for every RL stage on tokens.

1. **generate** — sample a response to each prompt with the KV cache, from the full distribution at
   temperature T (:mod:`proxrl.lm.sampling`); cut each response after its first stop token (LM-2).
2. **score** — the reward model or a Python function scores the *truncated* text; a response that never
   stopped loses ``missing_eos_penalty`` (the "EOS trick", LM-2).
3. **shape** — per-token reward = −β·kl_ref_k1 on every response token, plus the score on the last real
   response token (LM-3). ``kl_ref_k1`` = logp_old − logp_ref (k1: unbiased, the estimator in the reward);
   ``kl_ref`` logged = the mean over sequences of its sum (LM-8).
4. **advantages** — the token MDP as a :class:`~proxrl.batch.Batch` (EOS = terminated, length limit =
   truncated; the score is final, so nothing is bootstrapped after the last token) through
   :func:`proxrl.objective.estimate_advantages` — the function the gym path calls; advantages whitened over
   the whole rollout batch (LM-10). The critic-free rungs of ``rlhf train`` (pg, pg-baseline, rloo, grpo)
   weight every token by the response's return instead, minus a baseline over the batch or over the K
   samples of its prompt (:func:`sequence_advantages`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import core, objective
from ..batch import Batch
from ..errors import ConfigError, NumericsError
from ..run.fsdp import gathered
from ..run.guards import check_finite
from .loading import check_fits_context, encode_prompt, left_pad, stop_token_ids, use_chat_template
from .policy import LMPolicy, RewardModel, autocast, last_real_index, load_reward_model
from .sampling import sample

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
    prompt_ids: Optional[list[list[int]]] = None  # the prompts' token ids (unpadded), to regroup shards
    rows: Optional[slice] = None  # on several processes: this rank's rows of the global batch
    logp_behaviour: Optional[Tensor] = None  # [B, R] log μ of the sampled tokens when another policy sampled
    # them (rollout_lag > 0, or an outside engine filling it in); None: sampled by the policy being trained
    update: Optional[int] = None  # PPOTrainer.generate: the updates its trainer had done when it sampled them

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
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def token_batch(response_ids: Tensor, mask: Tensor, stopped: Tensor, logp_old: Tensor, rewards: Tensor,
                values: Tensor, logp_ref: Optional[Tensor] = None) -> Batch:
    """The token MDP as the shared ``[B, T]`` schema: an episode is one response; it ends at its last real
    token, ``terminated`` when that is a stop token, ``truncated`` at the length limit. The score is final
    either way, so V after the last token is 0 (no bootstrap)."""
    m = mask.to(rewards.dtype)
    last = last_real_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    terminated = torch.zeros_like(m)
    truncated = torch.zeros_like(m)
    terminated[rows, last] = stopped.to(m.dtype)
    truncated[rows, last] = (~stopped).to(m.dtype)
    values = values * m
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # V(s_{t+1})
    next_values[rows, last] = 0.0
    return Batch(obs=None, actions=response_ids, logp_old=logp_old, rewards=rewards, terminated=terminated,
                 truncated=truncated, mask=m, values=values, next_values=next_values, logp_ref=logp_ref)


def sequence_advantages(batch: Batch, prompts: Sequence[str], cfg) -> Batch:
    """``adv`` = the weight of every token of response i: its return R_i = Σ_t γ^t r_t (score − β·Σ kl_ref_k1
    at γ = 1), minus ``cfg.baseline`` over the batch or over the K = ``cfg.samples_per_prompt`` samples of
    its prompt (consecutive rows; checked); ``ret`` the reward-to-go (logged, no critic trains on it)."""
    returns = objective.estimate_advantages(batch, "return", cfg.gamma, 1.0)  # R of the episode, every step
    baseline = "none" if cfg.advantage == "sequence" else cfg.baseline
    k = cfg.samples_per_prompt
    if baseline in ("rloo", "group-norm"):
        B = len(prompts)
        if B % k or any(prompts[i] != prompts[i - i % k] for i in range(B)):
            raise ConfigError("samples_per_prompt", f"baseline {baseline} needs each prompt repeated K={k} times "
                              "in consecutive rows of the rollout")
    seq = objective.sequence_advantages(returns.adv[:, 0], baseline, k, cfg.scale_by_std)  # [B]
    return returns.replace(adv=seq[:, None] * batch.mask, ret=returns.ret)


# --------------------------------------------------------------------------- rewards
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:200] or "(no message)"


def load_reward_fn(spec: str) -> RewardFn:
    """``module:function`` or ``path/to/file.py:function``: a callable (prompts, responses) → floats.
    A module that cannot be imported — missing, a syntax error, an exception at import — is one
    ConfigError line naming the module and the problem (file and line for a syntax error)."""
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
        raise ConfigError("reward", f"cannot import {mod_name!r}: {_first_line(e)}") from None
    except SyntaxError as e:
        where = f"{e.filename or mod_name}:{e.lineno}" if e.lineno else (e.filename or mod_name)
        raise ConfigError("reward", f"cannot import {mod_name!r}: syntax error at {where}: {e.msg}",
                          "fix the reward file") from None
    except Exception as e:
        raise ConfigError("reward", f"importing {mod_name!r} raised {type(e).__name__}: {_first_line(e)}",
                          "fix the reward module (import it by hand to see the traceback)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError("reward", f"{mod_name!r} has no callable {fn_name!r}")
    return fn


def real_scores(out, name: str, where: str, field: str = "reward", verb: str = "returned") -> list[float]:
    """The reward function's output as floats: a list/tuple (or 1-D array/tensor) of real numbers. Strings,
    numeric strings, bools, dicts, sets, None are refused with one line (``float()`` would accept "0.5",
    True, and iterate a dict's keys)."""
    import numbers

    import numpy as np

    fix = "return one int or float per response, e.g. a list of floats"
    if isinstance(out, (torch.Tensor, np.ndarray)):
        if isinstance(out, torch.Tensor):
            real = out.dtype.is_floating_point or out.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                                torch.int64)
        else:
            real = out.dtype.kind in "iuf"
        if not real or out.ndim != 1:
            raise ConfigError(field, f"{name} {verb} a {out.ndim}-D {type(out).__name__} of {out.dtype}{where}",
                              fix)
        return [float(x) for x in out.tolist()]
    if not isinstance(out, (list, tuple)):
        raise ConfigError(field, f"{name} {verb} a {type(out).__name__}{where}, not a list of numbers", fix)
    vals = []
    for i, x in enumerate(out):
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0 and not isinstance(x, np.bool_):
            x = x.item()
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
            shown = repr(x) if len(repr(x)) <= 40 else repr(x)[:37] + "..."
            raise ConfigError(field, f"{name} {verb} {shown} ({type(x).__name__}) for response {i}{where}, "
                              "not a real number", fix)
        vals.append(float(x))
    return vals


class Scorer:
    """Scores rollouts with a reward model (token ids reused when it shares the policy's tokenizer and
    prompt format) or a Python function of the decoded text."""

    def __init__(self, reward: str | RewardFn | RewardModel, policy: LMPolicy, chat: bool, max_prompt_length: int,
                 batch_size: int):
        self.fn: Optional[RewardFn] = None
        self.rm: Optional[RewardModel] = None
        self.device = policy.device_name
        if isinstance(reward, RewardModel):
            self.rm = reward.to(self.device)
            self.name = "reward model"
        elif callable(reward):
            self.fn = reward
            self.name = f"reward function {getattr(reward, '__qualname__', type(reward).__name__)!r}"
        elif Path(reward).is_dir():
            self.rm = load_reward_model(reward, device=self.device)
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
        scores = self._scores(rollout, where)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:  # on several processes: this rank's rows, numbered as in the global batch
            off = rollout.rows.start if getattr(rollout, "rows", None) is not None else 0
            span = f" {off}–{off + len(scores) - 1}" if getattr(rollout, "rows", None) is not None else ""
            raise NumericsError(f"{self.name} returned {scores[bad[0]].item()} for {len(bad)} of {len(scores)} "
                                f"responses{span}{where} (first: response {off + bad[0]}, "
                                f"{rollout.responses[bad[0]][:40]!r})")
        return scores

    @torch.inference_mode()
    def _scores(self, rollout: Rollout, where: str = "") -> Tensor:
        if self.fn is not None:
            try:
                out = self.fn(list(rollout.prompts), list(rollout.responses))
            except (ConfigError, NumericsError):
                raise
            except Exception as e:  # the user's code: one line naming it, the update and the problem
                raise ConfigError("reward", f"{self.name} raised {type(e).__name__}{where}: {_first_line(e)}",
                                  "fix the function (call it by hand to see the traceback)") from None
            scores = torch.tensor(real_scores(out, self.name, where), dtype=torch.float64)
            if scores.shape != (len(rollout),):
                raise ConfigError("reward", f"{self.name} returned {scores.numel()} values for {len(rollout)} "
                                  f"responses{where}")
            return scores
        rm = self.rm
        if self.same_tokens:
            ids, mask = rollout.ids, rollout.mask
            eos = rm.tokenizer.eos_token_id
            if eos is not None and bool(rollout.stopped.any()):
                # a response that stopped at another stop token (a generation config's list, e.g. Llama 3's
                # end-of-turn) ends in the reward model's EOS, as it was trained (rm.encode_pairs) and as
                # the re-encoding path below scores it: the score is read there
                rows = rollout.stopped.nonzero().flatten()
                ids = ids.clone()
                ids[rows, rollout.query_ids.shape[1] + last_real_index(rollout.response_mask)[rows]] = eos
        else:  # a different tokenizer: decode and re-encode (documented cost)
            tok = rm.tokenizer
            seqs = []
            for p, r, stop in zip(rollout.prompts, rollout.responses, rollout.stopped.tolist()):
                q = encode_prompt(tok, p, self.rm_chat, self.max_prompt_length)
                a = tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stop else [])
                seqs.append(q + a)
            ids, mask = left_pad(seqs, tok.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = [rm(ids[i:i + self.chunk], mask[i:i + self.chunk]) for i in range(0, len(rollout), self.chunk)]
        return torch.cat(out).to("cpu", torch.float64)


class TokenRollouts:
    """Prompts → scored rollouts → the token :class:`~proxrl.batch.Batch` with advantages, for one policy.
    Holds what is fixed for a run: the tokenizer's pad and stop ids, the chat format, the prompt cache."""

    def __init__(self, policy: LMPolicy, cfg, dist=None):
        from ..run.dist import Dist

        self.policy, self.cfg, self.dist = policy, cfg, dist if dist is not None else Dist()
        tok = policy.tokenizer
        self.pad_id = tok.pad_token_id
        self.stop_ids = stop_token_ids(tok, policy.lm)
        self.chat = use_chat_template(tok, cfg.chat_template)
        self._encoded: dict[str, list[int]] = {}
        self.warned_negative_kl = False
        check_fits_context(policy.lm, cfg.max_prompt_length, cfg.response_length, "response_length")

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt token ids, tokenised once per distinct prompt and cached."""
        out = []
        for p in prompts:
            if p not in self._encoded:
                self._encoded[p] = encode_prompt(self.policy.tokenizer, p, self.chat, self.cfg.max_prompt_length)
            out.append(self._encoded[p])
        return out

    def generate(self, prompts: Sequence[str], seed: int) -> Rollout:
        """Sample one response per prompt from the sampling stream ``seed``: KV-cached, each token drawn
        exactly from softmax(logits / T) of the policy (no processors of the model's generation_config)."""
        cfg, d = self.cfg, self.dist
        n_all = len(prompts)
        rows = d.shard(n_all) if d.on else None  # on several processes: this rank's share of the batch
        prompts = list(prompts)[rows] if rows is not None else list(prompts)
        enc = self.encode(prompts)
        q_ids, q_mask = left_pad(enc, self.pad_id)
        dev = cfg.device
        stream = torch.Generator(device=dev).manual_seed(seed)
        with gathered(self.policy.lm), autocast(dev, self.policy.amp):  # fsdp: the weights gathered once
            resp = sample(self.policy.lm, q_ids.to(dev), q_mask.to(dev), cfg.response_length, cfg.temperature,
                          self.stop_ids, self.pad_id, stream, (rows, n_all) if rows is not None else None,
                          self.policy.top_k, self.policy.top_p).cpu()   # [B, R'] R' ≤ response_length
        resp_ids, resp_mask, stopped = truncate_at_stop(resp, self.stop_ids, self.pad_id)
        tok = self.policy.tokenizer
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp_ids, resp_mask)]
        return Rollout(prompts, q_ids, q_mask, resp_ids, resp_mask, stopped, texts, enc, rows)

    def gather(self, rollout: Rollout, *tensors: Tensor) -> tuple[Rollout, list[Tensor]]:
        """Every rank's rows, in order: the whole rollout (prompts left-padded as one batch, responses
        right-padded to the longest) and each per-row tensor (``[b]`` or ``[b, R]``, padded with 0)."""
        d = self.dist
        if not d.on:
            return rollout, list(tensors)
        parts = d.gather_objects((rollout.prompts, rollout.prompt_ids, rollout.responses))
        prompts = [p for part in parts for p in part[0]]
        enc = [q for part in parts for q in part[1]]
        texts = [t for part in parts for t in part[2]]
        q_ids, q_mask = left_pad(enc, self.pad_id)
        resp_ids = d.gather_rows(rollout.response_ids, self.pad_id)
        resp_mask = d.gather_rows(rollout.response_mask, 0)
        stopped = d.gather_rows(rollout.stopped, False)
        R = resp_ids.shape[1]
        out = []
        for t in tensors:
            g = d.gather_rows(t, 0)
            out.append(g[:, :R] if g.dim() > 1 else g)
        return Rollout(prompts, q_ids, q_mask, resp_ids, resp_mask, stopped, texts, enc, None), out

    def logp(self, rollout: Rollout) -> Tensor:
        """No-grad log-probs ``[B, R]`` of the rollout's response tokens under the policy as it is now."""
        ids, mask, R = rollout.ids.to(self.cfg.device), rollout.mask.to(self.cfg.device), rollout.response_ids.shape[1]
        mb = self.cfg.forward_batch_size
        with gathered(self.policy), torch.inference_mode():
            return torch.cat([self.policy(ids[i:i + mb], mask[i:i + mb], R, self.cfg.temperature, values=False,
                                          entropy=False)[0] for i in range(0, len(rollout), mb)])

    def forward(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """No-grad ``logp`` (policy), ``values`` and ``logp_ref`` of the rollout's response tokens, ``[B, R]``
        each, in chunks of ``forward_batch_size`` (fsdp: with the weights gathered once for all chunks).
        Without a critic (``critic = 'none'``) the values are zeros: no rung without one reads them."""
        ids, mask, R = rollout.ids.to(self.cfg.device), rollout.mask.to(self.cfg.device), rollout.response_ids.shape[1]
        T, mb = self.cfg.temperature, self.cfg.forward_batch_size
        critic = getattr(self.cfg, "critic", "head") != "none"  # the critic-free rungs: V = 0, never computed
        logp, values, logp_ref = [], [], []
        with gathered(self.policy), torch.inference_mode():
            for i in range(0, len(rollout), mb):
                lp, v, _ = self.policy(ids[i:i + mb], mask[i:i + mb], R, T, values=critic, entropy=False)
                logp.append(lp)
                values.append(v if critic else torch.zeros_like(lp))
                logp_ref.append(self.policy.ref_logp(ids[i:i + mb], mask[i:i + mb], R, T))
        return torch.cat(logp), torch.cat(values), torch.cat(logp_ref)

    def make_batch(self, rollout: Rollout, scores: Tensor, kl_coef: float, update: int) -> tuple[Batch, dict, Rollout]:
        """Old/reference log-probs and values, shaped rewards, GAE advantages. Returns the batch (``adv``
        whitened per ``norm_adv``), its statistics and the rollout it covers. Non-finite inputs raise a
        NumericsError naming them. On several processes ``rollout`` and ``scores`` are this rank's rows: the
        forwards run on them, then every rank's rows are gathered and the batch is the whole one."""
        cfg = self.cfg
        # clone: inference-mode tensors cannot be saved for backward
        logp_old, values, logp_ref = (t.clone() for t in self.forward(rollout))
        off_policy = rollout.logp_behaviour is not None or cfg.rollout_lag > 0
        logp_mu = (rollout.logp_behaviour.to(logp_old.device, logp_old.dtype) if rollout.logp_behaviour is not None
                   else logp_old)  # μ = π_old: the first update of a lagged run
        rollout, (logp_old, values, logp_ref, scores, logp_mu) = self.gather(
            rollout, logp_old, values, logp_ref, scores.to(logp_old.device), logp_mu)
        dtype, dev = logp_old.dtype, logp_old.device
        mask = rollout.response_mask.to(dev, dtype)
        stopped = rollout.stopped.to(dev)
        scores_penalised = apply_missing_eos_penalty(scores.to(dev, dtype), stopped, cfg.missing_eos_penalty)
        kl_ref_k1 = core.kl_k1(logp_old, logp_ref) * mask  # [B, R]
        estimator = getattr(cfg, "kl_estimator", "k1")  # rlhf train --kl-estimator (in the reward: k1 default)
        kl_reward = kl_ref_k1 if estimator == "k1" else core.kl_estimate(estimator, logp_old, logp_ref) * mask
        rewards = token_rewards(scores_penalised, kl_reward, mask, kl_coef)
        whitened = 0.0
        if cfg.whiten_rewards:
            if mask.sum() >= MIN_WHITEN_TOKENS:  # refuse on tiny batches rather than divide by ~0 (LM-10)
                rewards = core.masked_whiten(rewards, mask, shift_mean=False)
                whitened = 1.0
        batch = token_batch(rollout.response_ids.to(dev), mask, stopped, logp_old, rewards, values, logp_ref)
        if cfg.advantage == "gae":
            batch = objective.estimate_advantages(batch, "gae", cfg.gamma, cfg.gae_lambda)
        else:  # LM rungs 1–2: the response's return (minus a baseline over the prompt's K samples) on every token
            # in float64 from the float64 scores, then the batch's dtype: in float32 a score offset (1e6: an ulp
            # of 0.06) rounded away the differences between responses the baseline keeps (GRPO's all 0)
            f64 = torch.float64
            exact = token_rewards(apply_missing_eos_penalty(scores.to(dev, f64), stopped, cfg.missing_eos_penalty),
                                  kl_reward.to(f64), mask.to(f64), kl_coef)
            if whitened:
                exact = core.masked_whiten(exact, mask.to(f64), shift_mean=False)
            seq = sequence_advantages(token_batch(batch.actions, mask.to(f64), stopped, logp_old.to(f64), exact,
                                                  values.to(f64)), rollout.prompts, cfg)
            batch = batch.replace(adv=seq.adv.to(dtype), ret=seq.ret.to(dtype))
        adv = objective.normalize_advantages(batch.adv, mask, cfg.norm_adv)
        batch = batch.replace(adv=adv)
        off_stats = {}
        if off_policy:  # rung 4, truly off-policy: the sampler was μ, not π_old
            check_finite("behaviour log-probs", logp_mu, update, mask=mask)
            weight, kept = core.behaviour_correction(logp_old, logp_mu, mask, cfg.is_correction, cfg.is_cap)
            batch = batch.replace(adv=adv * weight, mask=kept)
            log_w = (logp_old - logp_mu) * mask
            var, ess = core.importance_weight_stats(log_w, mask)
            seq_mask = (mask.sum(-1) > 0).to(dtype)
            _, ess_seq = core.importance_weight_stats(log_w.sum(-1), seq_mask)
            off_stats = {"behaviour_weight_var": float(var), "behaviour_ess": float(ess),
                         "behaviour_ess_seq": float(ess_seq),
                         "behaviour_kl": float(core.masked_mean(core.kl_k3(logp_mu, logp_old), mask)),
                         "behaviour_capped_fraction": float(core.masked_mean((log_w > math.log(cfg.is_cap)).to(dtype), mask))}
        for name, x in (("log-probs of the sampled tokens", logp_old), ("reference log-probs", logp_ref),
                        ("values", values), ("rewards (score − β·kl_ref)", rewards), ("returns", batch.ret),
                        ("advantages", adv)):
            check_finite(name, x, update, mask=mask)
        kl_seq = kl_ref_k1.sum(-1)  # [B] per-sequence KL to the reference (k1)
        stats = {
            "reward_mean": scores.double().mean().item(),
            "score_mean": scores_penalised.double().mean().item(),
            "kl_ref": kl_seq.mean().item(),
            "kl_ref_k1": core.masked_mean(kl_ref_k1, mask).item(),
            "kl_ref_k3": (core.kl_k3(logp_old, logp_ref) * mask).sum(-1).mean().item(),
            "response_length": mask.sum(-1).mean().item(),
            "eos_rate": stopped.double().mean().item(),
            "rewards_whitened": whitened,
            **off_stats,
        }
        if stats["kl_ref_k1"] < -0.01 and not self.warned_negative_kl and not off_policy:  # μ samples: k1 may be < 0
            warnings.warn(f"mean k1 KL to the reference is negative ({stats['kl_ref_k1']:.4f}): the sampler and "
                          "the scored policy disagree (temperature? sampling filters?)", stacklevel=2)
            self.warned_negative_kl = True
        return batch, stats, rollout
