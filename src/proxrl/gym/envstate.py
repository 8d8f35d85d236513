"""Snapshot and restore the full state of a Gymnasium vector env without pickle, for exact resume.

A run is checkpointed between updates, when episodes are in mid-flight, so resuming exactly needs the
environments' own state: physics state, step counters, time-limit counters, autoreset flags and their
random generators. We walk every object of the env (vector env, each sub-env's wrapper chain, the
unwrapped env) and keep the attributes that are plain data: numpy arrays → tensors, scalars and
``np.random.Generator`` states → JSON, MuJoCo ``MjData`` → its integration state. Attributes of other
types are listed in ``unsupported``; the trainer warns when that list is not empty (resume then
continues, but is no longer guaranteed to be exact).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

_SKIP = {"metadata", "spec", "render_mode", "observation_space", "action_space", "single_observation_space",
         "single_action_space", "env_fns", "envs", "env", "closed", "screen", "clock", "viewer", "renderer",
         "mujoco_renderer", "_np_random_seed", "np_random_seed", "model", "fullpath", "frame_skip", "render_fps",
         "_observation_space", "_action_space", "_metadata", "_cached_spec", "_disable_render_order_enforcing",
         "_ezpickle_args", "_ezpickle_kwargs", "isopen", "world", "viewer_setup", "_env_checker", "checker",
         "_saved_kwargs", "autoreset_mode", "render_mode"}
_MJ_FIELDS = ("qpos", "qvel", "act", "qacc_warmstart", "ctrl", "qfrc_applied", "xfrc_applied", "mocap_pos",
              "mocap_quat", "plugin_state")


def _objects(vec) -> list[tuple[str, Any]]:
    """(path, object) for the vector env and every layer of every sub-env."""
    out = [("vec", vec)]
    for i, env in enumerate(getattr(vec, "envs", []) or []):
        j, layer = 0, env
        while True:
            out.append((f"env{i}.w{j}", layer))
            nxt = getattr(layer, "env", None)
            if nxt is None or nxt is layer:
                break
            layer, j = nxt, j + 1
    return out


def _json_scalar(v) -> bool:
    if v is None or isinstance(v, (bool, str)):
        return True
    if isinstance(v, numbers.Number):
        return np.isfinite(float(v)) if isinstance(v, float) else True
    if isinstance(v, (tuple, list)):
        return all(_json_scalar(x) for x in v)
    return False


def get_state(vec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"json": {}, "generators": {}, "mujoco": [], "unsupported": []}
    for path, obj in _objects(vec):
        for name, v in vars(obj).items():
            if name in _SKIP or callable(v) and not isinstance(v, np.random.Generator):
                continue
            key = f"{path}.{name}"
            if isinstance(v, np.ndarray):
                if v.dtype == object:
                    meta["unsupported"].append(key)
                    continue
                tensors[f"env/{key}"] = torch.from_numpy(np.ascontiguousarray(v).copy())
                meta["json"][key] = {"__array__": str(v.dtype)}
            elif isinstance(v, list) and v and all(isinstance(x, np.ndarray) and x.dtype != object for x in v):
                for i, x in enumerate(v):
                    tensors[f"env/{key}[{i}]"] = torch.from_numpy(np.ascontiguousarray(x).copy())
                meta["json"][key] = {"__array_list__": len(v)}
            elif isinstance(v, np.random.Generator):
                meta["generators"][key] = v.bit_generator.state
            elif isinstance(v, np.generic):
                meta["json"][key] = {"__numpy__": str(v.dtype), "value": v.item()}
            elif _json_scalar(v):
                meta["json"][key] = {"value": list(v) if isinstance(v, tuple) else v, "tuple": isinstance(v, tuple)}
            elif type(v).__name__ == "MjData":
                meta["mujoco"].append(key)
                meta["json"][key + ".time"] = {"value": float(v.time), "tuple": False}
                for f in _MJ_FIELDS:
                    arr = np.asarray(getattr(v, f, np.zeros(0)))
                    if arr.size:
                        tensors[f"env/{key}.{f}"] = torch.from_numpy(arr.copy())
            elif isinstance(v, (dict, set)) and not v:
                continue
            else:
                meta["unsupported"].append(key)
    return tensors, meta


def set_state(vec, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    objects = dict(_objects(vec))

    def split(key: str) -> tuple[Any, str]:
        path, name = key.rsplit(".", 1)
        if path not in objects:
            raise KeyError(f"environment layout changed: no {path}")
        return objects[path], name

    for key, info in meta["json"].items():
        if any(key.startswith(m + ".") for m in meta["mujoco"]):
            continue
        obj, name = split(key)
        if "__array_list__" in info:
            setattr(obj, name, [tensors[f"env/{key}[{i}]"].numpy().copy() for i in range(info["__array_list__"])])
        elif "__array__" in info:
            setattr(obj, name, tensors[f"env/{key}"].numpy().copy())
        elif "__numpy__" in info:
            setattr(obj, name, np.dtype(info["__numpy__"]).type(info["value"]))
        else:
            setattr(obj, name, tuple(info["value"]) if info.get("tuple") else info["value"])
    for key, state in meta["generators"].items():
        obj, name = split(key)
        gen = getattr(obj, name, None)
        if not isinstance(gen, np.random.Generator):
            gen = np.random.Generator(np.random.PCG64())
            setattr(obj, name, gen)
        gen.bit_generator.state = state
    for key in meta["mujoco"]:
        import mujoco

        obj, name = split(key)
        data = getattr(obj, name)
        for f in _MJ_FIELDS:
            t = tensors.get(f"env/{key}.{f}")
            if t is not None:
                getattr(data, f)[...] = t.numpy()
        data.time = meta["json"][key + ".time"]["value"]
        mujoco.mj_forward(obj.model, data)
