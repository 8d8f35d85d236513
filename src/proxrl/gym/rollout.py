"""Fixed-length vectorised rollouts: N envs × M steps into one :class:`~proxrl.batch.Batch`.

Observations and episode state carry over between rollouts — envs are never reset at an iteration
boundary (DETAILS 1). Gymnasium ≥ 1.0 autoresets on the NEXT step: the step after an episode ends
returns the reset observation with reward 0 and ignores the action. That step gets ``mask`` = 0 and is
never trained on; the observation it starts from is the episode's final observation, so V of it is
exactly the truncation bootstrap V(final obs) (DETAILS 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..batch import Batch
from .envs import ActionMap, DiscreteActions, ObsNormalizer, RewardScaler, validate_actions_once
from ..errors import ConfigError, NumericsError
from .policy import ActorCritic


@dataclass
class EpisodeStats:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


class Runner:
    """Owns the vector env's carried state: current observation, pending autoresets, episode sums."""

    def __init__(self, envs, policy: ActorCritic, seed: int, gamma: float, obs_norm: bool, reward_norm: bool,
                 clip_obs: float = 10.0, clip_reward: float = 10.0, device: str = "cpu", dist=None,
                 num_envs_global: Optional[int] = None, action_rescale: bool = False):
        from ..run.dist import Dist

        self.envs, self.policy, self.device = envs, policy, torch.device(device)
        validate_actions_once(envs)  # the runner's actions are valid by construction (no per-step re-check)
        self.num_envs = envs.num_envs
        # several processes: this rank steps envs [rows] of the run's envs (seeded by their global index)
        self.dist = dist if dist is not None else Dist()
        self.num_envs_global = num_envs_global if num_envs_global is not None else self.num_envs
        self.rows = self.dist.shard(self.num_envs_global) if self.dist.on else slice(0, self.num_envs)
        obs_shape = envs.single_observation_space.shape
        self.obs_dim = int(np.prod(obs_shape))
        self.obs_norm = ObsNormalizer((self.obs_dim,), clip_obs) if obs_norm else None
        self.reward_scaler = RewardScaler(self.num_envs, gamma, clip_reward) if reward_norm else None
        if self.dist.on:  # normalisers see every rank's rows: the statistics of one process with all envs
            self.rank_rows = self.dist.shares(self.num_envs_global)  # every rank's env count
            if self.obs_norm is not None:  # the next step's input: one collective per step
                self.obs_norm.rms.gather = self._gather_rows
            # the return statistics only scale stored rewards, which nothing reads before the update: they are
            # folded in at the rollout's end, step by step on every rank's rows (the same arithmetic, one collective)
        act_space = envs.single_action_space
        self.continuous = policy.kind == "continuous"
        if self.continuous:
            self.action_map = ActionMap(act_space.low, act_space.high, action_rescale)
            self.act_shape = act_space.shape
        else:  # category indices → the space's start and shape (None when they are the indices themselves)
            to_env = DiscreteActions.of(act_space)
            self.discrete_map = None if to_env.identity else to_env
        self.global_step = 0
        raw, _ = envs.reset(seed=seed + self.rows.start)
        self.raw_obs = self._check_obs(raw)
        self.pending_reset = np.zeros(self.num_envs, bool)  # next step is an autoreset step
        self.ep_return = np.zeros(self.num_envs, np.float64)
        self.ep_length = np.zeros(self.num_envs, np.int64)

    def _check_obs(self, raw) -> np.ndarray:
        try:
            raw = np.asarray(raw, dtype=np.float32).reshape(self.num_envs, -1)
        except (TypeError, ValueError) as e:
            raise NumericsError(f"observation: the environment returned something that is not a numeric array "
                                f"at step {self.global_step} ({str(e).splitlines()[0]})") from None
        if raw.shape[1] != self.obs_dim:
            raise NumericsError(f"observation: env returned shape {raw.shape[1:]}, its space says {self.obs_dim}")
        if not math.isfinite(raw.sum()) and not np.isfinite(raw).all():  # the sum first: one call, not two
            raise NumericsError(f"observation: NaN or inf from the environment at step {self.global_step}")
        return raw

    def _policy_obs(self, raw: np.ndarray, update: bool) -> torch.Tensor:
        obs = self.obs_norm(raw, update) if self.obs_norm is not None else raw
        return torch.from_numpy(obs).to(self.device)

    @torch.inference_mode()
    def collect(self, num_steps: int) -> tuple[Batch, EpisodeStats]:
        N, T, dev = self.num_envs, num_steps, self.device
        has_critic = self.policy.critic is not None
        obs_buf = torch.empty((T, N, self.obs_dim), device=dev)  # copied in: an env may reuse its arrays
        act_steps: list[torch.Tensor] = []  # fresh tensors of the sampler: stacked once after the loop
        rew = np.empty((T, N), np.float32)
        term = np.empty((T, N), bool)
        trunc = np.empty((T, N), bool)
        mask = np.empty((T, N), bool)
        stats = EpisodeStats()
        deferred = np.empty((T, N, 2), np.float64) if self.reward_scaler is not None and self.dist.on else None
        order: list[tuple[int, int]] = []  # (step, global env) of each finished episode
        # per step only what the env needs: the actor's forward and a sample. log π_old(a|s) and V(s) of the
        # whole rollout are one batched forward each after the loop (same weights: nothing trains in between)
        for t in range(T):
            obs = self._policy_obs(self.raw_obs, update=True)
            action = self._sample(obs)
            obs_buf[t] = obs
            act_steps.append(action)
            env_action = action.cpu().numpy()
            if self.continuous:  # map/clip what the env sees, keep the sample (DETAILS 7)
                env_action = self.action_map(env_action.reshape(N, -1)).reshape(N, *self.act_shape)
            elif self.discrete_map is not None:
                env_action = self.discrete_map(env_action)
            try:
                raw, reward, terminated, truncated, _ = self.envs.step(env_action)
                reward = np.asarray(reward, np.float64).reshape(N)
            except (TypeError, ValueError) as e:  # wrong shapes or types from a custom env
                raise NumericsError(f"environment step: {str(e).splitlines()[0]} at step {self.global_step}") from None
            except (ConfigError, NumericsError):
                raise
            except Exception as e:  # the env's own code failed: one line naming it, not a traceback
                raise ConfigError("env", f"the environment's step raised {type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or ['(no message)'])[0][:200]} at step "
                                  f"{self.global_step}", "fix the environment (step it by hand to see the "
                                  "traceback)") from None
            self.global_step += self.num_envs_global
            if not math.isfinite(reward.sum()) and not np.isfinite(reward).all():  # NaN/inf make the sum non-finite
                raise NumericsError(f"reward: NaN or inf from the environment at step {self.global_step}")
            valid = ~self.pending_reset
            terminated = np.asarray(terminated, bool) & valid
            truncated = np.asarray(truncated, bool) & valid
            ended = terminated | truncated
            if self.pending_reset.any():
                reward = np.where(valid, reward, 0.0)
            self.ep_return += reward
            self.ep_length += valid
            if ended.any():  # most steps end no episode: no per-step index work then
                for i in np.flatnonzero(ended):
                    stats.returns.append(float(self.ep_return[i]))
                    stats.lengths.append(int(self.ep_length[i]))
                    order.append((t, self.rows.start + int(i)))
                self.ep_return[ended] = 0.0
                self.ep_length[ended] = 0
            if self.reward_scaler is not None:
                if self.dist.on:  # scaled at the rollout's end (_scale_rewards)
                    deferred[t, :, 0], deferred[t, :, 1] = self.reward_scaler.accumulate(reward, valid, ended), reward
                else:
                    reward = self.reward_scaler(reward, valid, ended)
            rew[t], term[t], trunc[t], mask[t] = reward, terminated, truncated, valid
            self.pending_reset = ended
            self.raw_obs = self._check_obs(raw)
        if deferred is not None:
            self._scale_rewards(rew, deferred, mask)
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.T)).to(dev)  # [T, N] → [N, T]
        rollout = dict(obs=obs_buf.transpose(0, 1).contiguous(),  # [N, T, obs_dim]
                       last_obs=self._policy_obs(self.raw_obs, update=False)[:, None],  # [N, 1, obs_dim]
                       actions=torch.stack(act_steps, 1),  # [N, T, ...]
                       rewards=to_t(rew), terminated=to_t(term).float(), truncated=to_t(trunc).float(),
                       mask=to_t(mask).float())
        if self.dist.on:  # every rank holds the whole rollout (rows in global env order) and every episode, so
            rollout, stats = self._gather(rollout, order, stats)  # the forwards below are one process's
        obs_nt, last_obs = rollout.pop("obs"), rollout.pop("last_obs")
        logp_old = self.policy.dist(obs_nt).log_prob(rollout["actions"])  # [N, T]
        next_values = None
        values = None
        if has_critic:
            values = self.policy.value(torch.cat([obs_nt, last_obs], dim=1))  # [N, T+1]
            values, next_values = values[:, :-1].contiguous(), values[:, 1:].contiguous()
        return Batch(obs=obs_nt, logp_old=logp_old, values=values, next_values=next_values, **rollout), stats

    def _gather_rows(self, x: np.ndarray) -> np.ndarray:
        """Every rank's env rows of ``x`` in global env order, in its dtype: one collective per step (each
        rank's row count is its env share), for the observation normaliser."""
        return self.dist.gather_rows(torch.from_numpy(np.ascontiguousarray(x)), rows=self.rank_rows).numpy()

    def _scale_rewards(self, rew: np.ndarray, deferred: np.ndarray, valid: np.ndarray) -> None:
        """Several processes: the reward scaling one process does per step, done for the whole rollout at its
        end — every rank's G_t and valid rows gathered once, then the statistics updated step by step and each
        step's rewards (``deferred[..., 1]``, unscaled) scaled with them into ``rew``."""
        rows = np.concatenate([deferred[:, :, :1], valid[:, :, None]], 2).transpose(1, 0, 2)  # [N, T, 2]
        g = self.dist.gather_rows(torch.from_numpy(np.ascontiguousarray(rows, np.float64)), rows=self.rank_rows).numpy()
        for step in range(rew.shape[0]):  # every env of the run, in global order
            rew[step] = self.reward_scaler.update_and_scale(g[:, step, 0], g[:, step, 1] > 0.5, deferred[step, :, 1])

    def _gather(self, rollout: dict[str, torch.Tensor], order: list,
                stats: EpisodeStats) -> tuple[dict[str, torch.Tensor], EpisodeStats]:
        """The whole rollout on every rank: its tensors (each ``[N_r, T, ...]``, exact in float64) packed into one
        collective, the finished episodes (sorted into the order one process appends them in) into another."""
        N = self.num_envs
        flat = torch.cat([v.reshape(N, -1).to(torch.float64) for v in rollout.values()], 1)
        g = self.dist.gather_rows(flat, rows=self.rank_rows)
        out, off = {}, 0
        for k, v in rollout.items():
            w = int(np.prod(v.shape[1:]))
            out[k] = g[:, off:off + w].reshape(-1, *v.shape[1:]).to(v.dtype)
            off += w
        eps = torch.tensor([(t, e, r, n) for (t, e), r, n in zip(order, stats.returns, stats.lengths)],
                           dtype=torch.float64).reshape(-1, 4)
        allep = torch.cat(self.dist.gather_tensors([eps])[0])
        allep = allep[np.lexsort((allep[:, 1].numpy(), allep[:, 0].numpy()))] if len(allep) else allep
        return out, EpisodeStats([float(r) for r in allep[:, 2]], [int(n) for n in allep[:, 3]])

    def _sample(self, obs: torch.Tensor) -> torch.Tensor:
        """Actions for this rank's envs (observations ``obs``, already normalised). On several processes the
        policy is evaluated on a batch of the run's shape — this rank's rows at their global positions, zeros
        elsewhere — and sampled whole, of which the rank takes its rows: a matrix product's rows depend on the
        batch's shape in the last bit (CPU kernels block by shape), and a chaotic env (MuJoCo) grows that bit
        into another trajectory; with the shape of one process, the rows and the draws are one process's."""
        if not self.dist.on:
            return self.policy.dist(obs).sample()
        full = obs.new_zeros((self.num_envs_global, *obs.shape[1:]))
        full[self.rows] = obs
        return self.policy.dist(full).sample()[self.rows]

    # ------------------------------------------------------------------ checkpoint state
    #: the carried state that has one row per env (the rest, the normalisers' statistics, is the run's)
    PER_ENV_STATE = ("runner/raw_obs", "runner/pending_reset", "runner/ep_return", "runner/ep_length",
                     "ret_rms/discounted")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {
            "runner/raw_obs": torch.from_numpy(self.raw_obs.copy()),
            "runner/pending_reset": torch.from_numpy(self.pending_reset.copy()),
            "runner/ep_return": torch.from_numpy(self.ep_return.copy()),
            "runner/ep_length": torch.from_numpy(self.ep_length.copy()),
        }
        if self.obs_norm is not None:
            out.update(self.obs_norm.rms.state("obs_rms"))
        if self.reward_scaler is not None:
            out.update(self.reward_scaler.rms.state("ret_rms"))
            out["ret_rms/discounted"] = torch.from_numpy(self.reward_scaler.discounted.copy())
        return out

    def state_json(self) -> dict:
        return {"global_step": self.global_step}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what :meth:`state_tensors` and :meth:`state_json` saved (exact resume)."""
        self.global_step = int(meta["global_step"])
        self.raw_obs = tensors["runner/raw_obs"].numpy().copy()
        self.pending_reset = tensors["runner/pending_reset"].numpy().copy()
        self.ep_return = tensors["runner/ep_return"].numpy().copy()
        self.ep_length = tensors["runner/ep_length"].numpy().copy()
        if self.obs_norm is not None:
            self.obs_norm.rms.load(tensors, "obs_rms")
        if self.reward_scaler is not None:
            self.reward_scaler.rms.load(tensors, "ret_rms")
            self.reward_scaler.discounted = tensors["ret_rms/discounted"].numpy().copy()
