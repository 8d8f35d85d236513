"""Run state shared by every stage, in checkpoint form — tensors for safetensors, everything else
JSON-able (no pickle) — and the one place the global RNGs are seeded."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """``opt.state_dict()`` split into tensors ``{prefix}/{param}/{key}`` and JSON (param groups, keys)."""
    sd = opt.state_dict()
    tensors = {f"{prefix}/{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "keys": {str(i): sorted(st) for i, st in sd["state"].items()}}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    """Inverse of :func:`optimizer_state` (tensors are cloned: the loaded dict may be shared)."""
    state = {int(i): {k: tensors[f"{prefix}/{i}/{k}"].clone() for k in keys} for i, keys in meta["keys"].items()}
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    check_moments(opt, state)
    opt.load_state_dict({"state": state, "param_groups": groups})


def check_moments(opt: torch.optim.Optimizer, state: dict[int, dict]) -> None:
    """Each saved per-parameter moment has its parameter's shape and a floating dtype: a fused optimizer
    kernel does not check sizes, and a tensor of the wrong shape written into a checkpoint made it write out
    of bounds (a heap corruption, not an error line). Raises ValueError naming the first mismatch."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, st in state.items():
        if not 0 <= i < len(params):
            raise ValueError(f"optimizer state for parameter {i}, the optimizer has {len(params)}")
        for k, t in st.items():
            if k == "step":
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(params[i].shape):
                raise ValueError(f"optimizer moment {k} of parameter {i} has shape {tuple(getattr(t, 'shape', ()))}, "
                                 f"the parameter {tuple(params[i].shape)}")


def load_optimizer_states_flattened(opt: torch.optim.Optimizer, parts: list[tuple[str, dict]], tensors: dict,
                                    members: list[int]) -> None:
    """Load per-layer Adam states into an optimizer over contiguous leaves — the state an older checkpoint
    layout kept with one Adam per network and one entry per layer. ``parts``: the old single-group
    optimizers ``(prefix, meta)`` as :func:`optimizer_state` wrote them, in order; their layers, in that
    order, are the leaves' members, ``members[i]`` of them in leaf ``i`` (the leaves in ``opt``'s order).
    A leaf's ``exp_avg``/``exp_avg_sq`` are its layers' concatenated, its ``step`` their common step. Each
    group keeps its own keys (e.g. ``name``) and takes the saved hyperparameters of its first layer's part."""
    layers, group_of = [], []  # per old layer: its state (dict of tensors), its saved group
    for prefix, meta in parts:
        (saved,) = meta["param_groups"]  # one group each
        for i in saved["params"]:
            keys = meta["keys"].get(str(i), [])
            layers.append({k: tensors[f"{prefix}/{i}/{k}"] for k in keys})
            group_of.append(saved)
    if sum(members) != len(layers):
        raise ValueError(f"{len(layers)} saved parameters, the optimizer's leaves hold {sum(members)}")
    state, first_layer, start = {}, [], 0
    for leaf, n in enumerate(members):
        mine = layers[start:start + n]
        first_layer.append(start)
        start += n
        if not any(mine):
            continue
        if not all(mine) or len({float(st["step"]) for st in mine}) != 1:
            raise ValueError(f"the layers of leaf {leaf} were not stepped together")
        state[leaf] = {"step": mine[0]["step"].clone()}
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in mine[0]:
                state[leaf][k] = torch.cat([st[k].reshape(-1) for st in mine])
    groups, leaf = [], 0
    for group in opt.param_groups:
        saved = group_of[first_layer[leaf]]
        merged = {**{k: v for k, v in group.items() if k != "params"}, **{k: v for k, v in saved.items() if k != "params"}}
        merged["params"] = list(range(leaf, leaf + len(group["params"])))
        if "betas" in merged:
            merged["betas"] = tuple(merged["betas"])
        groups.append(merged)
        leaf += len(group["params"])
    check_moments(opt, state)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(prefix: str = "rng") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The global RNGs: torch CPU (and CUDA when initialised) as tensors, numpy and Python as JSON."""
    tensors = {f"{prefix}/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}/cuda/{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str = "rng") -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors[f"{prefix}/torch"])
    cuda = sorted((k for k in tensors if k.startswith(f"{prefix}/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    npst = meta["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    pyst = meta["python"]
    random.setstate((pyst[0], tuple(pyst[1]), pyst[2]))


#: Version of the checkpoint layout written by this proxrl (``state.json`` key ``version``). 1: no key
#: (proxrl ≤ 0.1, read as before); 2: the run layer (same tensors and keys, plus ``version``); 3: gym runs keep
#: one optimizer ``optimizer`` over the actor and the critic, one contiguous tensor each, instead of
#: ``actor_opt`` + ``critic_opt`` with one entry per layer (older gym checkpoints load, their states
#: concatenated; the LM layout is unchanged).
CHECKPOINT_VERSION = 3


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs from one seed (numpy takes it modulo 2³²). Every stage
    calls this once, before building models, so that initialisation is a function of the seed alone."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def scaler_state(scaler) -> Optional[dict]:
    """The fp16 gradient scaler's state as JSON numbers (the scale and its growth counter), for checkpoints;
    None without one."""
    if scaler is None:
        return None
    return {k: (float(v) if isinstance(v, float) else int(v) if isinstance(v, int) else v)
            for k, v in scaler.state_dict().items()}
