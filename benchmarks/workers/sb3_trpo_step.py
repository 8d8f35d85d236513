"""sb3-contrib side of benchmarks/trpo_compare.py; runs in the peers' venv (benchmarks/setup_peers.sh).

argv[1] is a JSON task naming a ``torch.save`` file written by the proxrl side: one rollout batch (per env,
valid steps only, [T, N, ...]), the proxrl weights, and the hyperparameters. The batch goes into an sb3-contrib
TRPO's rollout buffer with the same weights, SB3's own GAE is run on it, then one ``TRPO.train()`` with its
conjugate-gradient solver, Hessian-vector product and KL instrumented. The intermediate quantities are
written to the task's ``out`` file (``torch.save``); the last stdout line is a short JSON summary.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

# proxrl parameter name -> sb3 ActorCriticPolicy parameter name (default MlpPolicy, 2 hidden layers)
ACTOR = {"actor.0.weight": "mlp_extractor.policy_net.0.weight", "actor.0.bias": "mlp_extractor.policy_net.0.bias",
         "actor.2.weight": "mlp_extractor.policy_net.2.weight", "actor.2.bias": "mlp_extractor.policy_net.2.bias",
         "actor.4.weight": "action_net.weight", "actor.4.bias": "action_net.bias", "log_std": "log_std"}
CRITIC = {"critic.0.weight": "mlp_extractor.value_net.0.weight", "critic.0.bias": "mlp_extractor.value_net.0.bias",
          "critic.2.weight": "mlp_extractor.value_net.2.weight", "critic.2.bias": "mlp_extractor.value_net.2.bias",
          "critic.4.weight": "value_net.weight", "critic.4.bias": "value_net.bias"}


def main(task: dict) -> dict:
    import sb3_contrib.trpo.trpo as trpo_mod
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.manual_seed(task.get("seed", 0))
    data = torch.load(task["data"])
    hp = data["hp"]
    T, N = data["obs"].shape[:2]
    env = make_vec_env(task["env"], n_envs=N, seed=0)
    model = TRPO("MlpPolicy", env, n_steps=T, batch_size=hp["batch_size"], gamma=hp["gamma"],
                 gae_lambda=hp["gae_lambda"], cg_max_steps=hp["cg_max_steps"], cg_damping=hp["cg_damping"],
                 n_critic_updates=hp["n_critic_updates"], learning_rate=hp["learning_rate"],
                 target_kl=hp["target_kl"], line_search_shrinking_factor=hp["line_search_shrinking_factor"],
                 line_search_max_iter=hp["line_search_max_iter"], device="cpu", seed=task.get("seed", 0), verbose=0)
    pol = model.policy
    sd = pol.state_dict()
    for ours, theirs in {**ACTOR, **CRITIC}.items():
        assert sd[theirs].shape == data["weights"][ours].shape, (ours, theirs)
        sd[theirs] = data["weights"][ours].clone()
    pol.load_state_dict(sd)

    buf = model.rollout_buffer
    buf.reset()
    obs = data["obs"].numpy()
    buf.observations[:] = obs.reshape(buf.observations.shape)
    buf.actions[:] = data["actions"].numpy().reshape(buf.actions.shape)
    with torch.no_grad():
        flat_obs = torch.as_tensor(obs.reshape(T * N, -1))
        d = pol.get_distribution(flat_obs)
        logp = d.log_prob(torch.as_tensor(buf.actions.reshape(T * N, -1))).reshape(T, N)
        values = pol.predict_values(flat_obs).reshape(T, N)
    buf.log_probs[:] = logp.numpy()
    buf.values[:] = values.numpy()
    # SB3's truncation bootstrap (on_policy_algorithm.collect_rollouts): r += γ·V(terminal obs), then done
    rewards = data["rewards"].numpy().copy()
    trunc = data["truncated"].numpy().astype(bool)
    with torch.no_grad():
        v_final = pol.predict_values(torch.as_tensor(data["final_obs"].numpy().reshape(T * N, -1))).reshape(T, N).numpy()
    rewards = np.where(trunc, rewards + hp["gamma"] * v_final, rewards)
    buf.rewards[:] = rewards
    ended = trunc | data["terminated"].numpy().astype(bool)
    starts = np.zeros((T, N), np.float32)
    starts[1:] = ended[:-1]
    buf.episode_starts[:] = starts
    buf.pos, buf.full = T, True
    with torch.no_grad():
        last_values = pol.predict_values(torch.as_tensor(data["last_obs"].numpy()))
    buf.compute_returns_and_advantage(last_values, ended[-1])
    sb3_adv, sb3_ret = buf.advantages.copy(), buf.returns.copy()
    if task.get("use_proxrl_adv", True):  # the update compared on exactly the same advantages and returns
        buf.advantages[:] = data["adv"].numpy()
        buf.returns[:] = data["ret"].numpy()

    rec: dict = {"kl_calls": [], "cg": None, "hvp_last": None}
    cg = trpo_mod.conjugate_gradient_solver
    kl = trpo_mod.kl_divergence

    def cg_rec(fn, b, max_iter=10, residual_tol=1e-10):
        x = cg(fn, b, max_iter=max_iter, residual_tol=residual_tol)
        rec["cg"] = (b.detach().clone(), x.detach().clone())
        return x

    def kl_rec(p, q):
        out = kl(p, q)
        rec["kl_calls"].append(float(out.mean()))
        return out

    hvp = model.hessian_vector_product

    def hvp_rec(params, grad_kl, vector, retain_graph=True):
        out = hvp(params, grad_kl, vector, retain_graph=retain_graph)
        if not retain_graph:  # the call that scales the step: H·s
            rec["hvp_last"] = (vector.detach().clone(), out.detach().clone())
        return out

    trpo_mod.conjugate_gradient_solver, trpo_mod.kl_divergence = cg_rec, kl_rec
    model.hessian_vector_product = hvp_rec
    names = [n for n, _ in pol.named_parameters() if "value" not in n]
    theta0 = {n: p.detach().clone() for n, p in pol.named_parameters()}

    flat_t = lambda a: torch.as_tensor(a.reshape(T * N, *a.shape[2:]))  # noqa: E731  [T, N] -> [T·N], t-major
    obs_t, act_t = flat_t(buf.observations), flat_t(buf.actions)
    ret_t, adv_t, logp_t = flat_t(buf.returns), flat_t(buf.advantages), flat_t(buf.log_probs)
    adv_n = (adv_t - adv_t.mean()) / (adv_t.std() + 1e-8)

    def critic_mse() -> float:
        with torch.no_grad():
            return float(((pol.predict_values(obs_t).flatten() - ret_t) ** 2).mean())

    v_mse_before = critic_mse()
    model._logger = _NullLogger()
    model.train()
    v_mse_after = critic_mse()
    with torch.no_grad():
        d1 = pol.get_distribution(obs_t)
        surr_after = float((torch.exp(d1.log_prob(act_t) - logp_t) * adv_n).mean())
        d0_mean = None
    # the policy step in proxrl's parameter order
    order = list(ACTOR)
    by_sb3 = {v: k for k, v in ACTOR.items()}

    def to_ours(vec: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n in names:
            k = theta0[n].numel()
            parts[by_sb3[n]] = vec[i:i + k]
            i += k
        return torch.cat([parts[o] for o in order])

    g, s = rec["cg"]
    sv, hs = rec["hvp_last"]
    delta = torch.cat([(dict(pol.named_parameters())[ACTOR[o]].detach() - theta0[ACTOR[o]]).reshape(-1) for o in order])
    new_w = {o: dict(pol.named_parameters())[n].detach().clone() for o, n in {**ACTOR, **CRITIC}.items()}
    out = {"g": to_ours(g), "s": to_ours(s), "sHs": float(sv @ hs), "step": delta, "kl_calls": rec["kl_calls"],
           "surrogate_after": surr_after, "v_mse_before": v_mse_before, "v_mse_after": v_mse_after,
           "sb3_adv": torch.as_tensor(sb3_adv), "sb3_ret": torch.as_tensor(sb3_ret),
           "logp_recomputed_maxdiff": float((logp - data["logp_old"]).abs().max()), "new_weights": new_w,
           "param_names": names}
    torch.save(out, task["out"])
    return {"ok": True, "kl_calls": rec["kl_calls"], "sHs": out["sHs"], "surrogate_after": surr_after,
            "v_mse_before": v_mse_before, "v_mse_after": v_mse_after}


class _NullLogger:
    def record(self, *a, **k):
        pass


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    print(json.dumps(main(task)))
