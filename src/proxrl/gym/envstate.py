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


def _json_scalar(v, top: bool = True) -> bool:
    """Whether ``v`` comes back from ``state.json`` as it was: None, a bool, str, int or float (non-finite
    included: written as :func:`_encode` says), a list of such values (or of such lists) and, at the top, a tuple of
    them or a dict of str → a plain value (MuJoCo envs' ``observation_structure``). Numpy scalars inside a
    container are not (JSON cannot dump them, and a float would come back without its dtype)."""
    if v is None or type(v) in (bool, str, int, float):
        return True
    if isinstance(v, list) or top and isinstance(v, tuple):
        return all(_json_scalar(x, top=False) for x in v)
    if top and isinstance(v, dict):
        return all(type(k) is str and (x is None or type(x) in (bool, str, int, float)) for k, x in v.items())
    return False


def _encode(v):
    """A non-finite float as ``{"__float__": "inf"}``: ``state.json`` stays strict JSON (no ``Infinity``)."""
    if isinstance(v, float) and not np.isfinite(v):
        return {"__float__": repr(float(v))}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


def _decode(v):
    if isinstance(v, dict):
        return float(v["__float__"]) if set(v) == {"__float__"} else {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def get_state(vec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"json": {}, "generators": {}, "mujoco": [], "unsupported": [], "vector": type(vec).__name__}
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
                meta["json"][key] = {"__numpy__": str(v.dtype), "value": _encode(v.item())}
            elif _json_scalar(v):
                meta["json"][key] = {"value": _encode(v), "tuple": isinstance(v, tuple)}
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
            setattr(obj, name, np.dtype(info["__numpy__"]).type(_decode(info["value"])))
        else:
            value = _decode(info["value"])
            setattr(obj, name, tuple(value) if info.get("tuple") else value)
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


# ---------------------------------------------------------------------------- one state per env (resharding)
def _env_index(key: str) -> tuple[int, str]:
    """``env3.w1.x`` → (3, ``w1.x``)."""
    head, rest = key.split(".", 1)
    return int(head[3:]), rest


def split_envs(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[tuple[dict, dict]]:
    """The state of a ``SyncVectorEnv`` of n envs (``get_state``'s pair) as n states of one env each, in
    the env order, so that the envs of a run checkpointed on N processes can be dealt to M processes
    (:func:`merge_envs`). Raises ValueError when the state is not one of independent sub-envs (a
    numpy-vectorised env shares one generator over its envs: no split reproduces it)."""
    # checkpoints before the "vector" key: sub-env entries mean a vector env of separate envs
    vector = meta.get("vector", "SyncVectorEnv" if any(k.startswith("env0.") for k in meta["json"]) else "vector env")
    if vector != "SyncVectorEnv":
        raise ValueError(f"a {vector}'s envs share their state, so they cannot be dealt to another number of processes")
    n = int(meta["json"]["vec.num_envs"]["value"])
    parts = [({}, {"json": {}, "generators": {}, "mujoco": [], "unsupported": [], "vector": vector}) for _ in range(n)]
    for key, info in meta["json"].items():
        if key.startswith("vec."):
            for i, (t, m) in enumerate(parts):
                if "__array__" in info:
                    v = tensors[f"env/{key}"]
                    if v.dim() == 0 or v.shape[0] != n:
                        raise ValueError(f"vector env attribute {key} of shape {tuple(v.shape)} is not one row per env")
                    t[f"env/{key}"] = v[i].clone()
                    m["json"][key] = info
                elif "__array_list__" in info:
                    if info["__array_list__"] != n:
                        raise ValueError(f"vector env attribute {key} holds {info['__array_list__']} arrays for {n} envs")
                    t[f"env/{key}[0]"] = tensors[f"env/{key}[{i}]"]
                    m["json"][key] = {"__array_list__": 1}
                else:  # settings of the vector env (copy, observation mode, num_envs)
                    m["json"][key] = {**info, "value": 1} if key == "vec.num_envs" else info
            continue
        i, rest = _env_index(key)
        parts[i][1]["json"]["env0." + rest] = info
    for key, v in tensors.items():
        if key.startswith("env/env"):
            i, rest = _env_index(key[len("env/"):])
            parts[i][0]["env/env0." + rest] = v
    for key, state in meta["generators"].items():
        if key.startswith("vec."):
            raise ValueError(f"the vector env's own generator {key} is shared by its envs")
        i, rest = _env_index(key)
        parts[i][1]["generators"]["env0." + rest] = state
    for field in ("mujoco", "unsupported"):
        for key in meta.get(field, []):
            if key.startswith("vec."):
                if field == "unsupported":
                    for _, m in parts:
                        m[field].append(key)
                continue
            i, rest = _env_index(key)
            parts[i][1][field].append("env0." + rest)
    return parts


def merge_envs(parts: list[tuple[dict, dict]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`split_envs`: one ``SyncVectorEnv`` state of ``len(parts)`` envs, in order."""
    n = len(parts)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"json": {}, "generators": {}, "mujoco": [], "unsupported": [], "vector": "SyncVectorEnv"}
    renamed = lambda key, j: f"env{j}." + key[len("env0."):]  # noqa: E731
    for key, info in parts[0][1]["json"].items():
        if not key.startswith("vec."):
            continue
        if "__array__" in info:
            tensors[f"env/{key}"] = torch.stack([t[f"env/{key}"] for t, _ in parts])
            meta["json"][key] = info
        elif "__array_list__" in info:
            for j, (t, _) in enumerate(parts):
                tensors[f"env/{key}[{j}]"] = t[f"env/{key}[0]"]
            meta["json"][key] = {"__array_list__": n}
        else:
            meta["json"][key] = {**info, "value": n} if key == "vec.num_envs" else info
    for j, (t, m) in enumerate(parts):
        for key, info in m["json"].items():
            if key.startswith("env0."):
                meta["json"][renamed(key, j)] = info
        for key, v in t.items():
            if key.startswith("env/env0."):
                tensors["env/" + renamed(key[len("env/"):], j)] = v
        for key, state in m["generators"].items():
            meta["generators"][renamed(key, j)] = state
        meta["mujoco"] += [renamed(k, j) for k in m["mujoco"]]
        meta["unsupported"] += [renamed(k, j) if k.startswith("env0.") else k for k in m["unsupported"]]
    meta["unsupported"] = sorted(set(meta["unsupported"]))
    return tensors, meta
