"""RL on tokens (RLHF stage 3): the step-wise :class:`PPOTrainer` and the whole stage :func:`ppo`.

One update, top to bottom — :meth:`PPOTrainer.generate` → :meth:`~PPOTrainer.score` →
:meth:`~PPOTrainer.step` — composes the two halves every RL rung on tokens shares:

* :class:`proxrl.lm.rollout.TokenRollouts` — prompts → sampled, scored responses → the token
  :class:`~proxrl.batch.Batch` (shaping, GAE, whitening);
* :func:`proxrl.lm.update.sgd_update` — epochs × minibatches × micro-batches on that batch;

then the controllers: β of the KL-to-reference reward ← Ziegler et al.'s controller on the measured
``kl_ref`` (LM-9); the rung-5 penalty β (if used) ← ×2/÷2 once per update on the exact KL(π_old‖π_θ)
measured after the update (DETAILS 9).
"""

from __future__ import annotations

from collections import deque

import dataclasses
import hashlib
import json
import os
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import core
from ..batch import Batch
from ..errors import CheckpointError, ConfigError, NumericsError, check
from ..run import checkpoint
from ..run.progress import clock
from ..run.fsdp import full, shard_optimizer_state
from ..run.guards import Backup, check_parameters
from ..run.optim import make_adam
from ..run.rundir import NullWriter, RunWriter, lm_run_config, prepare_out
from ..run.signals import RunInterrupted, StopSignals
from ..run.state import (CHECKPOINT_VERSION, load_optimizer_state, optimizer_state, rng_state, scaler_state,
                         seed_everything, set_rng_state)
from .common import check_resume_options, keep_freed_memory, open_resume, relocate_saved
from .config import PPOConfig, RLConfig, absolute_path, check_new_out, ignored_options
from .data import read_records
from .policy import LMPolicy, RewardModel, build_policy, grad_scaler
from .rollout import (Rollout, RewardFn, Scorer, TokenRollouts, real_scores, apply_missing_eos_penalty,  # noqa: F401
                      load_reward_fn, token_batch, token_rewards, truncate_at_stop)
from .update import accumulate, exact_kl_to_old, importance_weights_after, micro_weight, sgd_update  # noqa: F401

#: the name kept for the step-wise API (one class for every stage's interruption)
PPOInterrupted = RunInterrupted


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
        if policy is None:
            seed_everything(cfg.seed)
            policy = build_policy(cfg.policy, cfg, "head" if cfg.critic == "none" else cfg.critic)
        self.policy = policy
        from ..run.dist import context

        self.dist = context(cfg.device)
        if self.dist.on and cfg.batch_size < self.dist.world:  # every rank generates and scores its rows
            raise ConfigError("batch_size", f"{cfg.batch_size} responses per update cannot give each of the "
                              f"{self.dist.world} processes one", f"pass --batch-size {self.dist.world} or more")
        if cfg.update_rule == "trust-region" and self.dist.on and cfg.parallel == "fsdp":
            raise ConfigError("parallel", "trpo's conjugate gradient works on the whole flat gradient, which "
                              "--parallel fsdp shards", "use --parallel ddp (the default) for trpo")
        if cfg.parallel == "fsdp" and self.dist.on:  # shards before the optimizer sees the parameters
            if cfg.critic == "separate":
                raise ConfigError("critic", "--critic separate is not sharded by --parallel fsdp (its LM's logits "
                                  "are not in the loss, so FSDP2 would not gather its root for backward)",
                                  "use --critic head, or --parallel ddp")
            policy.shard(self.dist)
        self.rollouts = TokenRollouts(policy, cfg, self.dist)
        self.scorer = Scorer(reward if reward is not None else cfg.reward, policy, self.rollouts.chat,
                             cfg.max_prompt_length, cfg.forward_batch_size)
        self.optimizer = make_adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
        self.scaler = grad_scaler(cfg.device, cfg.amp)  # fp16 only: loss scaling, overflowing steps skipped
        self.kl_coef = cfg.kl_coef
        self.penalty_beta = cfg.penalty_beta
        self.step_count = 0
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.still_updates = 0  # consecutive updates in which the policy did not move (warn_if_not_moving)
        self.warned_not_moving = False
        # rollout_lag L: the trained weights before each of the last L updates, oldest first (the sampler's)
        self.lagged: deque[dict[str, Tensor]] = deque(maxlen=max(cfg.rollout_lag, 1))

    @property
    def pad_id(self) -> int:
        return self.rollouts.pad_id

    @property
    def stop_ids(self) -> list[int]:
        return self.rollouts.stop_ids

    @property
    def chat(self) -> bool:
        return self.rollouts.chat

    # ---- 1. generate
    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.rollouts.encode(prompts)

    def generate(self, prompts: Sequence[str], seed: Optional[int] = None) -> Rollout:
        """Sample one response per prompt. ``seed`` (default: derived from the config seed and the update)
        names the sampling stream, so the same seed gives the same samples. With ``rollout_lag`` L > 0 the
        sampler is the policy of L updates ago and the rollout carries its log-probs (``logp_behaviour``)."""
        prompts = self._prompt_list(prompts, "generate")
        seed = self.cfg.seed * 1_000_003 + self.step_count if seed is None else seed
        if not (self.cfg.rollout_lag and self.lagged):
            rollout = self.rollouts.generate(prompts, seed)
            rollout.update = self.step_count
            return rollout
        current = {k: v.clone() for k, v in self.policy.trainable_state().items()}
        self.policy.load_trainable(self.lagged[0])
        try:
            rollout = self.rollouts.generate(prompts, seed)
            rollout.logp_behaviour = self.rollouts.logp(rollout).clone()
            rollout.update = self.step_count
        finally:
            self.policy.load_trainable(current)
        return rollout

    @staticmethod
    def _prompt_list(prompts, method: str, empty_ok: bool = False) -> list[str]:
        """The prompts a caller passes: a list (or other sequence) of strings. A bare string used to be taken as
        one prompt per character, and an empty list failed deep in the sampler."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            got = "a string" if isinstance(prompts, str) else "a sequence holding " + ", ".join(
                sorted({type(p).__name__ for p in prompts if not isinstance(p, str)}))
            raise ConfigError("prompts", f"{method}() takes a list of prompt strings, got {got}",
                              "pass a list, e.g. [prompt]")
        prompts = list(prompts)
        if not prompts and not empty_ok:
            raise ConfigError("prompts", f"{method}() got no prompts", "pass at least one prompt")
        return prompts

    # ---- 2. score
    def score(self, rollout: Rollout) -> Tensor:
        """Raw scores ``[B]`` of the truncated responses (reward model or function), before any penalty.
        NaN/inf scores raise a NumericsError naming the reward and the update (always, even with
        ``on_nonfinite='skip'``: a reward that returns NaN is a bug to fix, not a numerical accident).
        On several processes each rank scores its rows; an error on one rank stops all with its line."""
        return self._agreed(lambda: self.scorer(rollout, f" at update {self.step_count + 1}"))

    def _agreed(self, fn):
        """``fn()``, with an error on any rank raised on every rank (no rank left waiting in a collective)."""
        out, err = None, None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - agreed on, then re-raised as the same line everywhere
            err = e
        self.dist.agree(err)
        return out

    # ---- 3-6. shape, advantages, optimise, control
    def make_batch(self, rollout: Rollout, scores: Tensor) -> tuple[Batch, dict]:
        return self.rollouts.make_batch(rollout, scores, self.kl_coef, self.step_count + 1)[:2]

    def accumulate(self, batch: Batch, ids: Tensor, mask: Tensor, rows: Tensor) -> dict[str, float]:
        """Backward of one minibatch ``rows``, micro-batch by micro-batch (no optimizer step)."""
        return accumulate(self.policy, self.cfg, batch, ids, mask, rows, self.penalty_beta, self.step_count + 1, "",
                          kl_coef=self.kl_coef, scaler=self.scaler)

    def step(self, rollout: Rollout, scores: Tensor) -> dict[str, float]:
        """One PPO update on a scored rollout; returns its metrics.

        NaN/inf in the rewards, advantages, losses, gradient norm or updated weights raises a NumericsError
        naming the quantity and the update (``on_nonfinite='stop'``, the default: nothing is saved, so the
        last good checkpoint is intact). With ``on_nonfinite='skip'`` the weights and optimizer are put back
        as they were before the update, the update counts, and its metrics line says ``skipped`` (also
        printed on stderr) — never silently."""
        scores = self._agreed(lambda: self._checked_scores(rollout, scores))  # a rank's bad rows: every rank stops
        if self.cfg.rollout_lag:  # the weights this update starts from: a later update's sampler
            self.lagged.append({k: v.clone() for k, v in self.policy.trainable_state().items()})
        backup = None
        if self.cfg.on_nonfinite == "skip":
            backup = Backup(self.policy, [self.optimizer], state_dict=self.policy.trainable_state,
                            load=self.policy.load_trainable,
                            extra=(self.penalty_beta, self.kl_coef, scaler_state(self.scaler)))
        try:
            return self._step(rollout, scores)
        except NumericsError as e:
            if backup is None:
                raise
            self.penalty_beta, self.kl_coef, scaler_st = backup.restore()
            if scaler_st is not None:
                self.scaler.load_state_dict(scaler_st)
            self.step_count += 1
            print(f"warning: update {self.step_count} skipped: {e}", file=sys.stderr)
            return {"step": self.step_count, "beta": self.kl_coef, "beta_next": self.kl_coef,
                    "penalty_beta": self.penalty_beta, "skipped": str(e), "update_time": 0.0}

    def _checked_scores(self, rollout: Rollout, scores) -> Tensor:
        """The scores a caller passes to :meth:`step`: one real number per response of the rollout (a list,
        an array or a 1-D tensor), as float64 ``[B]``; anything else is one ConfigError line (a single score
        used to be broadcast to every response, a list to fail deep inside)."""
        where = f" at update {self.step_count + 1}"
        vals = torch.tensor(real_scores(scores, "the scores", where, field="scores", verb="are"), dtype=torch.float64)
        if vals.shape != (len(rollout),):
            raise ConfigError("scores", f"{vals.numel()} scores for the rollout's {len(rollout)} responses{where}",
                              "pass one score per response, in the rollout's order")
        if rollout.update is not None and rollout.update != self.step_count and rollout.logp_behaviour is None:
            # its tokens are another policy's samples: the ratio to π_old (= the policy now) would take them
            # as this policy's own, with no correction (step twice on one rollout, or a stale one)
            raise ConfigError("rollout", f"was sampled by the policy as it was after update {rollout.update}; "
                              f"stepping it{where} would train on its tokens as the current policy's samples, with "
                              "no correction", "generate a fresh rollout for every step (or set "
                              "rollout.logp_behaviour to the sampler's log-probs for an off-policy correction)")
        lm = self.policy.lm  # its actions: the tokenizer's ids (the logits cut to them: loading.token_logits)
        n = getattr(lm, "proxrl_vocab", None) or lm.get_input_embeddings().weight.shape[0]
        top = int((rollout.ids * rollout.mask).max()) if rollout.ids.numel() else 0
        if top >= n:  # an outside engine's rollout: an id past them was an index error deep in the update
            raise ConfigError("rollout", f"holds token id {top}, beyond the policy's {n} token ids{where} (an "
                              "engine that samples the model's padded embedding rows, or another tokenizer)",
                              "sample only the tokenizer's ids (e.g. mask logits past len(tokenizer))")
        return vals

    def _step(self, rollout: Rollout, scores: Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg = self.cfg
        update = self.step_count + 1
        # on several processes rollout/scores are this rank's rows; the batch (and `rollout` below) the whole
        kl_in_loss = cfg.kl_in == "loss"  # β·KL in the loss (GRPO), not in the reward
        batch, stats, rollout = self.rollouts.make_batch(rollout, scores, 0.0 if kl_in_loss else self.kl_coef, update)
        t_forward = time.perf_counter() - t0
        ids, mask = rollout.ids.to(cfg.device), rollout.mask.to(cfg.device)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        penalty = cfg.surrogate == "kl-penalty"
        theta_old = [p.detach().clone() for p in params] if penalty else None
        trust_region = cfg.update_rule == "trust-region"
        if trust_region:  # rung 7: CG on Fisher-vector products + line search, no optimizer step
            from .trust_region import trust_region_update

            metrics = trust_region_update(self.policy, cfg, batch, ids, mask, update, self.kl_coef, self.dist)
        else:
            metrics = sgd_update(self.policy, self.optimizer, cfg, batch, ids, mask, self.penalty_beta, self.shuffle,
                                 update, self.dist, self.kl_coef, self.scaler)
        self._agreed(lambda: check_parameters(self.policy.named_parameters(), update))  # fsdp: each rank its shard
        if penalty:  # once per update, on the exact KL after it, as on the gym side (DETAILS 9)
            metrics["kl_old_exact"] = exact_kl_to_old(self.policy, params, theta_old, ids, mask, batch.mask,
                                                      cfg.temperature, cfg.micro_batch_size, self.dist)
            self.penalty_beta = core.ppo_beta_update(self.penalty_beta, metrics["kl_old_exact"], cfg.penalty_target_kl)
        single_step = not trust_region and cfg.update_epochs * cfg.num_minibatches == 1
        if (cfg.surrogate == "is" and not trust_region) or single_step:
            after = importance_weights_after(self.policy, ids, mask, batch, cfg.temperature, cfg.micro_batch_size)
            if cfg.surrogate == "is":  # rung 4: how far the update moved from the sampling policy
                metrics.update(after)
            else:  # one optimizer step: the in-update approx_kl was measured before it (0)
                metrics["approx_kl_after"] = after["approx_kl_after"]
        metrics.setdefault("clip_fraction", 0.0)
        self.warn_if_not_moving(metrics)
        beta_used = self.kl_coef
        if cfg.adaptive_kl:
            self.kl_coef = core.ziegler_beta_update(self.kl_coef, stats["kl_ref"], cfg.target_kl_ref, len(rollout),
                                                    cfg.kl_horizon)
        self.step_count += 1
        ev = float(core.explained_variance(batch.values, batch.ret, batch.mask)) if cfg.critic != "none" else math.nan
        dt = time.perf_counter() - t0
        return {"step": self.step_count, **stats, "beta": beta_used, "beta_next": self.kl_coef,
                "penalty_beta": self.penalty_beta, **metrics,
                "explained_variance": ev if math.isfinite(ev) else None,  # None: the returns have no variance
                "skipped": None, "update_time": dt, "forward_time": t_forward, "train_time": dt - t_forward}

    NOT_MOVING_KL, NOT_MOVING_UPDATES = 1e-6, 3

    def warn_if_not_moving(self, metrics: dict) -> None:
        """One stderr line per run when the policy has not moved for 3 consecutive updates: the KL to π_old
        after the update (``approx_kl_after`` of a single optimizer step, the accepted trust-region step's
        ``approx_kl``, else the in-update ``approx_kl``) and the clip fraction both < 1e-6."""
        kl = metrics.get("approx_kl_after", metrics.get("approx_kl", 0.0))
        still = kl < self.NOT_MOVING_KL and (metrics.get("clip_fraction") or 0.0) < self.NOT_MOVING_KL
        self.still_updates = self.still_updates + 1 if still else 0
        if self.still_updates >= self.NOT_MOVING_UPDATES and not self.warned_not_moving:
            self.warned_not_moving = True
            if self.cfg.update_rule == "trust-region":
                fix = "raise --max-kl (the trust region δ), or check that the reward varies between responses"
            else:
                fix = ("raise --lr (LoRA usually needs 1e-4..1e-3), or check that the reward varies between "
                       "responses")
            if self.dist.main:
                print(f"warning: policy is not moving (KL to π_old < {self.NOT_MOVING_KL:g} for "
                      f"{self.NOT_MOVING_UPDATES} updates): {fix}", file=sys.stderr)

    # ---- evaluation and state
    def evaluate(self, prompts: Sequence[str], seed: int = 12345) -> dict:
        """Mean raw score and KL to the reference on ``prompts`` with a fixed sampling seed (the same
        before and after training), plus the responses."""
        prompts = self._prompt_list(prompts, "evaluate", empty_ok=True)
        if not prompts:
            return {"reward_mean": float("nan"), "kl_ref": float("nan"), "eos_rate": float("nan"), "responses": []}
        rollout = self.rollouts.generate(prompts, seed)  # the policy itself, never a lagged sampler
        scores = self._agreed(lambda: self.scorer(rollout, " on the held-out prompts"))
        logp, _, logp_ref = self.rollouts.forward(rollout)
        kl = ((logp - logp_ref) * rollout.response_mask.to(logp.device)).sum(-1)
        rollout, (scores, kl) = self.rollouts.gather(rollout, scores, kl.to(scores.dtype).cpu())
        return {"reward_mean": scores.mean().item(), "kl_ref": kl.mean().item(),
                "eos_rate": rollout.stopped.double().mean().item(),
                "responses": [{"prompt": p, "response": r, "reward": float(s)}
                              for p, r, s in zip(rollout.prompts, rollout.responses, scores.tolist())]}

    def state(self) -> dict:
        return {"step": self.step_count, "kl_coef": self.kl_coef, "penalty_beta": self.penalty_beta,
                "still_updates": self.still_updates, "warned_not_moving": self.warned_not_moving}

    def checkpoint_state(self, copy: bool = True) -> tuple[dict[str, Tensor], dict]:
        """Everything of the trainer that decides the rest of a run: trainable weights (``policy.*``: LoRA
        adapters or trained weights, value head), Adam state (``optimizer/*`` + JSON param groups — the
        learning rate is constant, so they are the whole schedule), the minibatch/prompt shuffle generator
        (``rng/shuffle``), both β, the update counter and, with fp16, the gradient scaler's state (``grad_scaler``:
        its scale and growth counter). The sampling seed of update u is derived from
        ``seed`` and u, so nothing more is needed for generation.

        The tensors are copies (a snapshot that later updates leave as it is); ``copy=False`` returns views of
        the live weights and Adam moments, which the next :meth:`step` changes — only for writing them out at
        once (the stage loop's checkpoint), without a second copy in memory."""
        tensors = {f"policy.{k}": v for k, v in self.policy.trainable_state().items()}
        opt_t, opt_meta = optimizer_state(self.optimizer, "optimizer")
        tensors.update({k: full(v) for k, v in opt_t.items()})  # fsdp: the moments gathered from the shards
        if copy:
            tensors = {k: v.clone() for k, v in tensors.items()}
        tensors["rng/shuffle"] = self.shuffle.get_state()
        for i, snap in enumerate(self.lagged if self.cfg.rollout_lag else ()):
            tensors.update({f"lagged/{i}/{k}": v for k, v in snap.items()})  # already copies, never changed
        return tensors, {**self.state(), "optimizer": opt_meta, "warned_negative_kl": self.rollouts.warned_negative_kl,
                         "grad_scaler": scaler_state(self.scaler)}

    def load_checkpoint_state(self, tensors: dict[str, Tensor], state: dict) -> None:
        """Inverse of :meth:`checkpoint_state` (the trainer must be built from the same config)."""
        own = {k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")}
        expected = set(self.policy.trainable_state())
        if set(own) != expected:
            missing = sorted(expected - set(own))[:3] or sorted(set(own) - expected)[:3]
            raise CheckpointError(f"checkpoint weights do not fit the policy (e.g. {missing})")
        self.policy.load_trainable(own)
        load_optimizer_state(self.optimizer, "optimizer", tensors, state["optimizer"])
        shard_optimizer_state(self.optimizer)  # fsdp: each rank keeps the shard of its parameters' moments
        self.shuffle.set_state(tensors["rng/shuffle"])
        if self.scaler is not None:  # fp16: the loss scale and its growth counter continue
            if not isinstance(state.get("grad_scaler"), dict):
                raise CheckpointError("checkpoint: an fp16 run's checkpoint without the gradient scaler's state")
            self.scaler.load_state_dict(state["grad_scaler"])
        self.lagged.clear()
        i = 0
        while self.cfg.rollout_lag and any(k.startswith(f"lagged/{i}/") for k in tensors):
            snap = {k[len(f"lagged/{i}/"):]: v for k, v in tensors.items() if k.startswith(f"lagged/{i}/")}
            if set(snap) != expected:
                raise CheckpointError("checkpoint: a lagged sampler's weights do not fit the policy")
            self.lagged.append(snap)
            i += 1
        self.step_count = int(state["step"])
        self.kl_coef = float(state["kl_coef"])
        self.penalty_beta = float(state["penalty_beta"])
        self.rollouts.warned_negative_kl = bool(state.get("warned_negative_kl", False))
        self.still_updates = int(state.get("still_updates", 0))
        self.warned_not_moving = bool(state.get("warned_not_moving", False))


# --------------------------------------------------------------------------- the whole stage
def split_prompts(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    shuffled = [prompts[i] for i in order]
    n_eval = min(n_eval, max(len(prompts) - 1, 0))
    return shuffled[n_eval:], shuffled[:n_eval]


def _prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


#: Fields ``--resume`` lets differ from the saved run: the budget (``updates``, raised only), the reward
#: (a code reward is given again; checked below) and ``parallel`` (how the processes share the models, not
#: what they compute: checkpoints hold full tensors). Every other field given explicitly must equal the saved one.
#: options --resume lets change: the budget, the reward (code is given again), the process layout and how
#: often / how many checkpoints are written (none of them changes what the run computes)
RESUME_MAY_CHANGE = ("updates", "reward", "resume", "out", "parallel", "checkpoint_every", "keep_checkpoints")


def resolve_resume(config: PPOConfig, reward_given: bool = False,
                   explicit: Optional[Sequence[str]] = None) -> tuple[PPOConfig, dict, dict]:
    """The saved config of the run in ``config.resume`` (with ``out`` = that directory) and its latest
    checkpoint. Raises a one-line CheckpointError if there is none or it is not a PPO run checkpoint.
    ``explicit``: the fields the user gave (the CLI's options; None: every field away from its default).
    One of them that differs from the saved run is a one-line ConfigError naming it, except ``updates``,
    which may be raised to extend the run.

    Nothing read from the run directory decides which code runs: a reward that is Python code
    (``module:function`` or ``file.py:function``) is never imported from the checkpoint — the caller
    passes it again (``--reward`` on the command line, or the callable), and it must be the same one."""
    run_dir, tensors, state = open_resume(config, config.COMMAND)
    saved = state.get("config")
    if state.get("stage") != "ppo" or not isinstance(saved, dict) or "run" not in state:
        raise CheckpointError(f"{run_dir}: not a resumable proxrl PPO checkpoint (written by an older version "
                              "or another stage)")
    relocate_saved(saved, run_dir, ("policy", "prompts", "reward"))
    cls = type(config)  # PPOConfig (rlhf ppo) or RLConfig (rlhf train, which also resumes a ppo run)
    fields = cls.__dataclass_fields__
    unknown = sorted(set(saved) - set(fields))
    if unknown and "algo" in saved:
        raise CheckpointError(f"{run_dir}: a run of `proxrl rlhf train --algo {saved['algo']}`; resume it with "
                              f"proxrl rlhf train --resume {run_dir}")
    if unknown:
        raise CheckpointError(f"{run_dir}: checkpoint config has unknown fields {unknown[:3]}")
    saved_reward = str(saved.get("reward") or "")
    if not reward_given and not _is_reward_model_dir(saved_reward):
        if not config.reward:
            raise CheckpointError(f"{run_dir}: the run's reward {saved_reward[:80]!r} is code, which is never "
                                  f"imported from a run directory; pass it again: --reward {saved_reward[:80]}")
        if absolute_path(config.reward, code=True) != saved_reward:
            raise CheckpointError(f"{run_dir}: the run was trained with --reward {saved_reward[:80]}, not "
                                  f"{config.reward[:80]}; pass the same reward to resume")
    if explicit is None:  # a config object was passed: every field set away from its default counts as given
        default = cls()
        explicit = [n for n in fields if getattr(config, n) != getattr(default, n)]
    had = cls(**{**saved, "resume": None, "out": str(run_dir), "overwrite": False})
    check_resume_options(config, had, run_dir, explicit, RESUME_MAY_CHANGE, ("policy", "prompts"),
                         "only --updates (raised, to extend the run) and how often checkpoints are written may "
                         "change; start a new run with another --out to change it")
    if "reward" in explicit and config.reward and _is_reward_model_dir(saved_reward) \
            and absolute_path(config.reward, code=True) != saved_reward:
        raise ConfigError("reward", f"--resume continues the run with its reward model {saved_reward}; it cannot "
                          f"change to {config.reward}", "drop --reward, or start a new run with another --out")
    if "updates" in explicit and config.updates != had.updates:
        done = int(state.get("step", 0))
        check(config.updates >= max(done, 1), "updates", f"the run has already done {done} updates; --updates "
              f"{config.updates} would end it before that", f"give at least {done} (more extends the run)")
        had.updates = config.updates
    return had, tensors, state


def _restarted_with_checkpoint(out: str) -> bool:
    """A worker restarted by torchrun (``--max-restarts``) whose run already wrote a checkpoint."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) <= 0 or not out:
        return False
    return bool(checkpoint.list_checkpoints(Path(out) / "checkpoints"))


def _is_reward_model_dir(spec: str) -> bool:
    """A reward-model run directory is data (config.json + safetensors), never code."""
    from .loading import read_run_config

    run = read_run_config(spec) if spec and Path(spec).is_dir() else None
    return run is not None and run.get("stage") == "rm"


def train(config: RLConfig, reward: str | RewardFn | RewardModel | None = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), policy: Optional[LMPolicy] = None,
          explicit: Optional[Sequence[str]] = None) -> dict:
    """Train with the rung ``config.algo`` of the ladder on tokens (pg, pg-baseline, rloo, grpo, pg-rtg,
    is-pg, ppo-kl, ppo-clip, trpo): the stage loop of :func:`ppo` with the rung's choices (trpo's update is
    :func:`proxrl.lm.trust_region.trust_region_update` instead of the SGD epochs). With
    ``samples_per_prompt`` K > 1 each update answers ``batch_size / K`` prompts K times each."""
    return ppo(config, reward, log, policy, explicit=explicit)


def ppo(config: PPOConfig, reward: str | RewardFn | RewardModel | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), policy: Optional[LMPolicy] = None,
        explicit: Optional[Sequence[str]] = None) -> dict:
    """Train with PPO; writes everything to ``config.out``; returns the summary (also ``summary.json``).
    An :class:`~proxrl.lm.config.RLConfig` runs its rung (:func:`train`) through this same loop.

    A full checkpoint (see :meth:`PPOTrainer.checkpoint_state`, plus the global torch/numpy/Python RNGs,
    the prompt cursor and shuffle order, the held-out "before" evaluation and the elapsed time) is written
    every ``checkpoint_every`` updates, at the end, and on SIGINT/SIGTERM (after the update in progress;
    then :class:`~proxrl.run.signals.RunInterrupted`, exit 130/143 from the CLI). ``config.resume = DIR``
    continues that run from its latest checkpoint with its saved config: the result is bit-identical (CPU)
    to the run never interrupted — metrics lines apart from wall-clock fields, and every checkpointed tensor.
    A reward that is code is never imported from the checkpoint: pass the same ``reward`` (callable, or
    ``config.reward`` = the same ``module:function``) again. An ``out`` that already holds a run is refused
    unless ``config.overwrite``; with ``resume``, an option in ``explicit`` (the fields the caller set; None:
    those away from their defaults) that differs from the saved run is refused, except ``updates`` (raised:
    the run is extended)."""
    resumed = None
    if not config.resume and _restarted_with_checkpoint(config.out):  # torchrun --max-restarts: continue by itself —
        config.validate()  # only its own run, whose config is the one given (every field compared), not a run --out
        explicit = [f.name for f in dataclasses.fields(config)]  # held before the first attempt failed
        config = dataclasses.replace(config, resume=config.out, overwrite=False)
    if config.resume:
        config, ckpt_tensors, ckpt_state = resolve_resume(config, reward_given=reward is not None, explicit=explicit)
        resumed = (ckpt_tensors, ckpt_state)
        policy = None
    cfg = config
    name = "ppo" if cfg.COMMAND == "ppo" else cfg.algo  # the log prefix
    if reward is not None and not isinstance(reward, str):
        cfg.reward = cfg.reward or getattr(reward, "__qualname__", "python-function")
    cfg.validate()
    overwrite = False
    if resumed is None:  # before any work; a restart before the first checkpoint starts again over its own run only
        overwrite = check_new_out(cfg.out, cfg.overwrite, "ppo", cfg, command=f"proxrl rlhf {cfg.COMMAND}")
    seed_everything(cfg.seed)  # a reward function may draw from these: seeded, checkpointed, restored
    records = read_records(cfg.prompts, "ppo")
    if cfg.eval_prompts and len(records) <= cfg.eval_prompts:
        raise ConfigError("eval_prompts", f"{cfg.eval_prompts} held-out prompts leave none of the {len(records)} "
                          f"in {cfg.prompts} for training", f"pass --eval-prompts {len(records) - 1} or less, or add prompts")
    train_prompts, eval_prompts = split_prompts([r["prompt"] for r in records], cfg.eval_prompts, cfg.seed)
    digest = _prompts_digest(train_prompts + ["\0"] + eval_prompts)
    try:
        trainer = PPOTrainer(cfg, policy=policy, reward=reward)
    except ConfigError as e:  # the policy's tokenizer has no EOS: the option is --policy here, not --model
        if e.field != "model" or "EOS" not in str(e):
            raise
        raise ConfigError("policy", str(e).split(": ", 1)[1]) from None
    d = trainer.dist  # several processes (torchrun): rank 0 prints and writes, every rank computes
    if resumed is None and explicit is not None and d.main:  # options given that the rung does not use: said
        for line in ignored_options(cfg, set(explicit)):
            print(f"warning: {line}", file=sys.stderr)
    if d.on and 0 < len(eval_prompts) < d.world:  # the held-out prompts are shared out like a batch
        raise ConfigError("eval_prompts", f"{len(eval_prompts)} held-out prompts cannot give each of the {d.world} "
                          "processes one", f"pass --eval-prompts {d.world} or more, or 0")
    if not d.main:
        log = lambda *_: None  # noqa: E731
    out = Path(cfg.out)
    cursor, order = 0, []
    trainer.encode(train_prompts + eval_prompts)  # every prompt tokenised (chat template applied) before any work
    if resumed is None:
        elapsed0 = 0.0
        before = trainer.evaluate(eval_prompts)  # the reward's first call: a reward that fails leaves no run behind
        if d.main:  # the old run (with --overwrite) is removed only now that the models have loaded and scored
            prepare_out(out, overwrite=overwrite, command=f"proxrl rlhf {cfg.COMMAND}")
        writer = RunWriter(out, lm_run_config("ppo", cfg.policy, cfg)) if d.main else NullWriter()
        writer.samples("before training (held-out prompts)", [(r["prompt"], r["response"], r["reward"]) for r in before["responses"]])
        if cfg.top_k or cfg.top_p < 1:  # reported as such: the policy trained is the truncated one
            log(f"{name}: sampling truncated to " + " and ".join(x for x in (f"top-k {cfg.top_k}" if cfg.top_k else "",
                f"top-p {cfg.top_p:g}" if cfg.top_p < 1 else "") if x) + " at temperature "
                f"{cfg.temperature:g}; log-probs, ratios and the KL to the reference are of that truncated distribution")
        log(f"{name}: {len(train_prompts)} train / {len(eval_prompts)} held-out prompts"
            + (f"; held-out reward before {before['reward_mean']:+.4f}" if eval_prompts else ""))
    else:
        tensors, st = resumed
        run = st["run"]
        if run.get("prompts_sha256") != digest:
            raise CheckpointError(f"{out}: the prompts in {cfg.prompts} changed since the checkpoint; an exact "
                                  "resume needs the same prompts file")
        try:
            trainer.load_checkpoint_state(tensors, st)
            set_rng_state(tensors, run["rng"])
            cursor, order, before, elapsed0 = int(run["cursor"]), [int(i) for i in run["order"]], run["before"], float(run["elapsed"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{out}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
        writer = RunWriter.resume(out, "step", trainer.step_count, run.get("samples_bytes"))[0] if d.main else NullWriter()
        if d.main and int(st.get("config", {}).get("updates", cfg.updates)) != cfg.updates:  # --updates raised
            checkpoint.write_json_atomic(out / "config.json", lm_run_config("ppo", cfg.policy, cfg))
        log(f"{name}: resuming {out} after update {trainer.step_count}/{cfg.updates}")
    t_start = time.perf_counter() - elapsed0
    samples_bytes = writer.samples_path.stat().st_size if writer.samples_path.is_file() else None

    def save() -> None:
        """Rank 0 writes (every rank holds the same state), once every rank has finished the update; the
        state is taken on every rank (fsdp: full tensors are gathered from the shards, a collective)."""
        d.barrier()
        tensors, st = trainer.checkpoint_state(copy=False)  # written at once: views suffice
        if d.main:
            rng_t, rng_meta = rng_state()
            tensors.update(rng_t)
            st.update(stage="ppo", version=CHECKPOINT_VERSION, config=asdict(cfg), run={
                "cursor": cursor, "order": order, "before": before, "elapsed": time.perf_counter() - t_start,
                "samples_bytes": samples_bytes, "rng": rng_meta, "prompts_sha256": digest, "world_size": d.world})
            checkpoint.save(out / "checkpoints", trainer.step_count, tensors, st, keep=cfg.keep_checkpoints)
        d.barrier()

    first = trainer.step_count + 1
    n_samples = cfg.samples_per_prompt  # K responses per prompt
    with StopSignals() as stop:
        for update in range(first, cfg.updates + 1):
            t0, comm0 = time.perf_counter(), trainer.dist.comm_s
            batch_prompts = []
            while len(batch_prompts) < cfg.batch_size // n_samples:  # epochs over the prompts, a fresh shuffle each
                if cursor >= len(order):
                    order = torch.randperm(len(train_prompts), generator=trainer.shuffle).tolist()
                    cursor = 0
                batch_prompts.append(train_prompts[order[cursor]])
                cursor += 1
            if n_samples > 1:  # K samples of each prompt in consecutive rows (the group baselines rely on it)
                batch_prompts = [p for p in batch_prompts for _ in range(n_samples)]
            rollout = trainer.generate(batch_prompts)
            t_gen = time.perf_counter() - t0
            scores = trainer.score(rollout)
            t_score = time.perf_counter() - t0 - t_gen
            m = trainer.step(rollout, scores)
            dt = time.perf_counter() - t0
            m["generate_time"], m["score_time"] = t_gen, t_score
            m["comm_time"] = trainer.dist.comm_s - comm0  # proxrl's collectives (FSDP2's own are not counted)
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
                if m.get("steps_skipped"):
                    log(f"update {m['step']:>3}/{cfg.updates}  fp16: {m['steps_skipped']} optimizer step(s) skipped "
                        f"(gradients overflowed), loss scale now {m['loss_scale']:g}")
                log(f"update {m['step']:>3}/{cfg.updates}  reward {m['reward_mean']:+.4f}  kl_ref {m['kl_ref']:.3f}  "
                    f"beta {m['beta']:.4f}  approx_kl {m['approx_kl']:.4f}  clip {m['clip_fraction']:.3f}  "
                    f"len {m['response_length']:.1f}  eos {m['eos_rate']:.2f}  {dt:.1f}s  "
                    f"eta {clock((m['time'] - elapsed0) / (update - first + 1) * (cfg.updates - update))}")
            last = update == cfg.updates
            stopping = d.any(stop.signum is not None)  # a signal seen by one rank stops every rank
            if last or stopping or (cfg.checkpoint_every and update % cfg.checkpoint_every == 0):
                save()
            if stopping and not last:
                code_reward = not _is_reward_model_dir(cfg.reward)  # code is passed again, never read back
                import signal as _signal

                raise RunInterrupted(stop.signum or _signal.SIGTERM, out, update, f"proxrl rlhf {cfg.COMMAND}",
                                     f" --reward {cfg.reward}" if code_reward else "")
    after = trainer.evaluate(eval_prompts)
    writer.samples("after training (held-out prompts)", [(r["prompt"], r["response"], r["reward"]) for r in after["responses"]])
    summary = {"reward_before": before["reward_mean"], "reward_after": after["reward_mean"],
               "kl_ref": after["kl_ref"], "kl_ref_before": before["kl_ref"], "eos_rate_before": before["eos_rate"],
               "eos_rate_after": after["eos_rate"], "updates": cfg.updates,
               "wall_time": time.perf_counter() - t_start,
               "before": before["responses"], "after": after["responses"]}
    if d.main:
        checkpoint.write_json_atomic(out / "summary.json", summary)
    held = (f"held-out reward {before['reward_mean']:+.4f} → {after['reward_mean']:+.4f}, kl_ref {after['kl_ref']:.3f}"
            if eval_prompts else "no held-out prompts (eval_prompts 0)")  # never a line of NaNs
    log(f"{name}: {held}, {summary['wall_time']:.0f}s")
    return summary
