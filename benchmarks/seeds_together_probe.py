"""Would running a rung's seeds together in one process (stacked parameters, one batched kernel per layer)
make ``proxrl ladder`` cheaper? Times, in one process, 1 thread, the update steps that dominate the ladder on
CartPole-v1 for S seeds: S separate minibatch steps (one network per seed, as the ladder's runs do now)
against one step over seed-stacked parameters (``baddbmm`` per layer, the per-seed losses summed, per-seed
gradient-norm clip, one fused Adam), with proxrl's own loss functions on both sides.

* ``ppo``: actor + critic 64-64 tanh, clipped surrogate + entropy + value loss, 256 samples per seed (the
  is-pg / ppo-kl presets: 8 envs × 32 steps, one minibatch);
* ``critic``: the critic alone, 128 samples per seed (TRPO's critic fit: 1024 steps / 8 minibatches).

    python benchmarks/seeds_together_probe.py [--seeds 3] [--tag s9]    # results/seeds_together-<tag>.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from _common import command_line, machine, write_json
from proxrl import core
from proxrl.objective import surrogate_loss

H, OBS, ACT = 64, 4, 2


def _params(shapes, S, g):
    return [torch.randn(S, *sh, generator=g) * 0.1 for sh in shapes]


def _mlp(ps, x, stacked):
    for i in range(0, len(ps), 2):
        w, b = ps[i], ps[i + 1]
        x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)) if stacked else F.linear(x, w, b)
        if i + 2 < len(ps):
            x = torch.tanh(x)
    return x


def _shapes(n_out):
    return [(H, OBS), (H,), (H, H), (H,), (n_out, H), (n_out,)]


def make_case(kind: str, S: int, B: int):
    g = torch.Generator().manual_seed(0)
    actor, critic = _params(_shapes(ACT), S, g), _params(_shapes(1), S, g)
    nets = ([actor] if kind == "ppo" else []) + [critic]
    obs, act = torch.randn(S, B, OBS, generator=g), torch.randint(0, ACT, (S, B), generator=g)
    logp_old, adv, ret = -torch.rand(S, B, generator=g), torch.randn(S, B, generator=g), torch.randn(S, B, generator=g)

    def loss_fn(nets_p, s):  # s: a seed index (separate) or None (stacked, every seed at once)
        o, a, lo, ad, r = (t if s is None else t[s] for t in (obs, act, logp_old, adv, ret))
        v = _mlp(nets_p[-1], o, s is None).squeeze(-1)
        loss = core.value_loss(v, r)
        if kind == "ppo":
            lp = torch.log_softmax(_mlp(nets_p[0], o, s is None), -1)
            logp = lp.gather(-1, a.unsqueeze(-1)).squeeze(-1)
            ad = (ad - ad.mean(-1, keepdim=True)) / (ad.std(-1, keepdim=True) + 1e-8)  # per seed
            pl, _ = surrogate_loss("clip", logp, lo, ad, None, clip_coef=0.2, ratio_stats=False, kl_stats=False)
            loss = pl - 0.01 * (-(lp.exp() * lp).sum(-1)).mean() + 0.5 * loss
        return loss * (S if s is None else 1)  # stacked: the sum of the seeds' means (equal sizes)

    # separate: each seed's networks as their own leaves and its own Adam
    sep = [[[p[s].clone().requires_grad_() for p in net] for net in nets] for s in range(S)]
    sep_opt = [torch.optim.Adam([p for net in sep[s] for p in net], lr=1e-3, eps=1e-5, fused=True) for s in range(S)]
    # stacked: one flat [S, P] leaf per network, the layers views of it
    flats = [torch.cat([p.reshape(S, -1) for p in net], 1).requires_grad_() for net in nets]
    shapes = [[p.shape[1:] for p in net] for net in nets]
    st_opt = torch.optim.Adam(flats, lr=1e-3, eps=1e-5, fused=True)

    def views(flat, shp):
        out, off = [], 0
        for sh in shp:
            n = torch.Size(sh).numel()
            out.append(flat[:, off:off + n].view(S, *sh))
            off += n
        return out

    def separate():
        for s in range(S):
            ps = [p for net in sep[s] for p in net]
            for p in ps:
                p.grad = None
            loss_fn(sep[s], s).backward()
            torch.nn.utils.clip_grad_norm_(ps, 0.5)
            sep_opt[s].step()

    def stacked():
        for f in flats:
            f.grad = None
        loss_fn([views(f, sh) for f, sh in zip(flats, shapes)], None).backward()
        norm = torch.cat([f.grad for f in flats], 1).norm(dim=1, keepdim=True)  # per seed
        coef = (0.5 / (norm + 1e-6)).clamp(max=1.0)
        for f in flats:
            f.grad.mul_(coef)
        st_opt.step()

    return separate, stacked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for kind, B in (("ppo", 256), ("critic", 128)):
        fns = dict(zip(("separate", "stacked"), make_case(kind, args.seeds, B)))
        for fn in fns.values():
            for _ in range(50):
                fn()
        times = {k: [] for k in fns}
        for _ in range(args.reps):  # interleaved
            for k, fn in fns.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[k].append((time.perf_counter() - t) / args.steps * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[kind] = {"samples_per_seed": B, "us_per_step_all_seeds": med, "times": times,
                     "speedup": med["separate"] / med["stacked"]}
        print(f"{kind:7s} {args.seeds} seeds × {B} samples: separate {med['separate']:.0f} µs, stacked "
              f"{med['stacked']:.0f} µs per step of all seeds — {out[kind]['speedup']:.2f}×")
    x1, x3 = torch.randn(256, H), torch.randn(args.seeds, 256, H)
    el = {}
    for name, x in (("1", x1), (str(args.seeds), x3)):
        t = time.perf_counter()
        for _ in range(2000):
            torch.tanh(x)
        el[name] = (time.perf_counter() - t) / 2000 * 1e6
    print(f"tanh of 256×{H} per seed: 1 seed {el['1']:.1f} µs, {args.seeds} seeds {el[str(args.seeds)]:.1f} µs")
    out["tanh_us"] = el
    write_json(f"seeds_together{'-' + args.tag if args.tag else ''}.json",
               {"command": command_line("seeds_together_probe.py", sys.argv[1:] if argv is None else argv),
                "machine": machine(None), "seeds": args.seeds, "results": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
