"""Issue 15: proxrl ``trpo`` vs sb3-contrib TRPO on the *same* batch with the *same* weights, step by step.

    python benchmarks/trpo_compare.py --peer-python PEERS/bin/python [--warmup 20] [--seed 1]

proxrl trains ``--warmup`` updates with its HalfCheetah-v5/trpo preset, collects one more rollout, and hands
that batch (valid steps, normalised observations and rewards as proxrl saw them) and its weights to
``workers/sb3_trpo_step.py`` in the peers' venv, which runs SB3's GAE on it and one sb3-contrib
``TRPO.train()``. proxrl then takes its own update on the same batch from the same weights (a fresh critic
Adam on both sides, learning rate not annealed) and the script prints, side by side: the advantages from
both GAEs, the policy gradient g, the CG solution s, sᵀ(F+λI)s, the step, the line-search fractions and KLs,
the surrogate gain, and the critic's MSE before/after. Written to benchmarks/results/trpo_compare[-TAG].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

from _common import RESULTS, add_peer_args, peer_python, run_worker, write_json


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--warmup", type=int, default=20, help="proxrl updates before the compared batch")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="proxrl config overrides, e.g. max_grad_norm=0")
    ap.add_argument("--tag", default="")
    add_peer_args(ap)
    args = ap.parse_args(argv)
    peer = peer_python(args)
    torch.set_num_threads(1)

    from proxrl import core
    from proxrl.gym import update as upd
    from proxrl.gym.config import resolve
    from proxrl.gym.envs import make_vec_env
    from proxrl.gym.rollout import Runner
    from proxrl.gym.trainer import build_policy
    from proxrl.run.state import seed_everything
    from proxrl.objective import estimate_advantages
    from proxrl.run.optim import make_adam
    from proxrl.rungs import RUNGS

    over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg, _ = resolve(dict(env=args.env, algo="trpo", seed=args.seed, progress="off", **over))
    rung = RUNGS[cfg.algo]
    seed_everything(cfg.seed)
    envs = make_vec_env(cfg.env, cfg.num_envs)
    policy = build_policy(envs, cfg)
    critic_opt = make_adam(policy.critic.parameters(), cfg.lr, eps=1e-5)
    runner = Runner(envs, policy, cfg.seed, cfg.gamma, cfg.obs_norm, cfg.reward_norm, cfg.clip_obs, cfg.clip_reward,
                    action_rescale=cfg.action_rescale)
    warm = []
    for u in range(1, args.warmup + 1):
        batch, eps = runner.collect(cfg.num_steps)
        batch = estimate_advantages(batch, rung.weight, cfg.gamma, cfg.gae_lambda)
        flat = batch.flatten_valid()
        st = upd.trust_region_update(policy, critic_opt, flat, rung, cfg, u, policy.snapshot(flat.obs[:, 0]))
        warm.append({"update": u, "episode_return": sum(eps.returns) / len(eps.returns) if eps.returns else None,
                     "surrogate_gain": -st["policy_loss"], "ls_step_fraction": st["ls_step_fraction"]})

    batch, _ = runner.collect(cfg.num_steps)
    last_obs = runner._policy_obs(runner.raw_obs, update=False)
    batch = estimate_advantages(batch, rung.weight, cfg.gamma, cfg.gae_lambda)
    N = batch.obs.shape[0]
    keep = batch.mask.bool()
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        sys.exit("envs have different numbers of valid steps in this rollout; try another --warmup")
    Tv = int(counts[0])
    next_obs = torch.cat([batch.obs[:, 1:], last_obs[:, None]], 1)

    def tn(x):  # [N, T] valid steps -> [T', N, ...] (SB3's buffer layout)
        return x[keep].reshape(N, Tv, *x.shape[2:]).transpose(0, 1).contiguous()

    weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    hp = dict(batch_size=cfg.batch_size // cfg.critic_minibatches, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
              cg_max_steps=cfg.cg_iters, cg_damping=cfg.cg_damping, n_critic_updates=cfg.critic_epochs,
              learning_rate=cfg.lr, target_kl=cfg.max_kl, line_search_shrinking_factor=cfg.backtrack_coef,
              line_search_max_iter=cfg.backtrack_iters)
    data = {"obs": tn(batch.obs), "actions": tn(batch.actions), "logp_old": tn(batch.logp_old),
            "rewards": tn(batch.rewards), "terminated": tn(batch.terminated), "truncated": tn(batch.truncated),
            "final_obs": tn(next_obs), "last_obs": last_obs, "adv": tn(batch.adv), "ret": tn(batch.ret),
            "weights": weights, "hp": hp}
    flat = batch.flatten_valid()

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(data, os.path.join(tmp, "batch.pt"))
        task = {"data": os.path.join(tmp, "batch.pt"), "out": os.path.join(tmp, "sb3.pt"), "env": cfg.env,
                "seed": cfg.seed, "threads": 1}
        summary = run_worker(peer, "sb3_trpo_step", task, timeout=1800)
        sb3 = torch.load(task["out"])

    # proxrl's update on the same batch: fresh critic Adam (as the SB3 side), instrumented through proxrl.core
    rec: dict = {"ls": []}
    cg0, ls0 = core.conjugate_gradient, core.backtracking_line_search

    def cg_rec(avp, b, iters=10, residual_tol=1e-10):
        x = cg0(avp, b, iters, residual_tol)
        rec["g"], rec["s"], rec["sFs"] = b.detach().clone(), x.detach().clone(), float(x @ avp(x))
        return x

    def ls_rec(evaluate, max_kl, coef, iters):
        def ev(frac):
            imp, kl = evaluate(frac)
            rec["ls"].append((frac, imp, kl))
            return imp, kl
        return ls0(ev, max_kl, coef, iters)

    core.conjugate_gradient, core.backtracking_line_search = cg_rec, ls_rec
    theta0 = torch.nn.utils.parameters_to_vector(policy.actor_parameters()).detach().clone()
    obs, ret = flat.obs[:, 0], flat.ret[:, 0]
    with torch.no_grad():
        v_before = float(((policy.value(obs) - ret) ** 2).mean())
    fresh = make_adam(policy.critic.parameters(), cfg.lr, eps=1e-5)
    st = upd.trust_region_update(policy, fresh, flat, rung, cfg, args.warmup + 1, policy.snapshot(obs))
    core.conjugate_gradient, core.backtracking_line_search = cg0, ls0
    with torch.no_grad():
        v_after = float(((policy.value(obs) - ret) ** 2).mean())
    step = torch.nn.utils.parameters_to_vector(policy.actor_parameters()).detach() - theta0

    # the same critic fit without proxrl's gradient-norm clip, from the same weights (isolates max_grad_norm)
    critic_ab = {}
    for clip in (cfg.max_grad_norm, 0.0):
        policy.critic.load_state_dict({k[len("critic."):]: v for k, v in weights.items() if k.startswith("critic.")})
        torch.manual_seed(cfg.seed)
        opt = make_adam(policy.critic.parameters(), cfg.lr, eps=1e-5)
        upd.train_critic(policy, opt, flat, cfg.critic_epochs, cfg.critic_minibatches, clip, None, 0)
        with torch.no_grad():
            critic_ab[f"max_grad_norm={clip}"] = float(((policy.value(obs) - ret) ** 2).mean())

    adv_px, adv_sb3 = data["adv"], sb3["sb3_adv"]
    g_p, g_s, s_p, s_s = rec["g"], sb3["g"], rec["s"], sb3["s"]
    sb3_kls = sb3["kl_calls"][1:]  # the first call is KL at θ_old (0), the rest are line-search tries
    res = {
        "config": {"warmup": args.warmup, "seed": args.seed, "set": over, "batch_valid_steps": int(flat.obs.shape[0])},
        "warmup": warm,
        "logp_old_recomputed_by_sb3_maxdiff": sb3["logp_recomputed_maxdiff"],
        "gae": {"adv_maxabs_diff": float((adv_px - adv_sb3).abs().max()), "adv_std": float(adv_px.std()),
                "ret_maxabs_diff": float((data["ret"] - sb3["sb3_ret"]).abs().max()),
                "truncations": int(data["truncated"].sum())},
        "g": {"norm_proxrl": float(g_p.norm()), "norm_sb3": float(g_s.norm()), "cos": cos(g_p, g_s),
              "maxabs_diff": float((g_p - g_s).abs().max())},
        "s": {"norm_proxrl": float(s_p.norm()), "norm_sb3": float(s_s.norm()), "cos": cos(s_p, s_s)},
        "sFs": {"proxrl": rec["sFs"], "sb3": sb3["sHs"]},
        "step_size": {"proxrl": math.sqrt(2 * cfg.max_kl / rec["sFs"]), "sb3": math.sqrt(2 * cfg.max_kl / sb3["sHs"])},
        "line_search": {"proxrl_tries": [[f, i, k] for f, i, k in rec["ls"]], "proxrl_accepted": st["ls_step_fraction"],
                        "sb3_kls_tried": sb3_kls,
                        "sb3_accepted_fraction": float(sb3["step"].norm() /
                                                       (math.sqrt(2 * cfg.max_kl / sb3["sHs"]) * s_s.norm()))},
        "step": {"norm_proxrl": float(step.norm()), "norm_sb3": float(sb3["step"].norm()), "cos": cos(step, sb3["step"])},
        "surrogate_gain": {"proxrl": -st["policy_loss"], "sb3": sb3["surrogate_after"]},
        "critic_mse": {"proxrl_before": v_before, "proxrl_after": v_after, "sb3_before": sb3["v_mse_before"],
                       "sb3_after": sb3["v_mse_after"], "proxrl_clip_vs_noclip_after": critic_ab},
    }
    print(json.dumps(res, indent=1))
    write_json(f"trpo_compare{'-' + args.tag if args.tag else ''}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
