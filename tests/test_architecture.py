"""The layout keeps its rules (gym/ and lm/ never import each other; no module imports another's private
name), checkpoints written before the run layer still load, and the LM rung-5 β is driven by the exact KL
after the update."""

from __future__ import annotations

import ast
import copy
import shutil
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "proxrl"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"


def _imports(path: Path):
    """(module, names) of every import in a file, relative imports resolved against its package."""
    pkg = ["proxrl", *path.relative_to(SRC).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_gym_and_lm_never_import_each_other_and_run_imports_neither():
    bad = []
    for path in SRC.rglob("*.py"):
        room = path.relative_to(SRC).parts[0]
        for mod, _ in _imports(path):
            if room == "gym" and mod.startswith("proxrl.lm"):
                bad.append(f"{path.name} imports {mod}")
            if room == "lm" and mod.startswith("proxrl.gym"):
                bad.append(f"{path.name} imports {mod}")
            if room == "run" and (mod.startswith("proxrl.lm") or mod.startswith("proxrl.gym")):
                if not (path.name == "checkpoint.py" and mod == "proxrl.gym.config"):  # the schema check (documented)
                    bad.append(f"run/{path.name} imports {mod}")
    assert not bad, bad


def test_no_module_imports_a_private_name():
    bad = [f"{p.relative_to(SRC)}: {mod}.{n}" for p in SRC.rglob("*.py") for mod, names in _imports(p)
           for n in names if n.startswith("_") and not n.startswith("__") and mod.startswith("proxrl")]
    assert not bad, bad


def test_v1_gym_checkpoint_loads_and_evaluates(tmp_path):
    import proxrl

    run = tmp_path / "gym"
    shutil.copytree(FIXTURES / "gym-cartpole", run)
    agent = proxrl.load(run)
    assert agent.policy.kind == "discrete"
    # the same evaluation the v1 code gave when the fixture was written (mean return 63.0 over 3 episodes)
    assert proxrl.evaluate(run, episodes=3, seed=7)["mean_return"] == pytest.approx(63.0)


def test_v1_gym_checkpoint_resumes_and_continues_the_same_run(tmp_path):
    """A checkpoint of the two-optimizer layout (actor_opt + critic_opt, versions ≤ 2) resumes into the one
    optimizer of layout 3 and continues as the code before layout 3 continued it (its figures, resuming this
    fixture to 2048 steps, recorded before the layout changed; to 1e-5, since the flat gradient norm rounds
    differently). policy_loss is not compared: it was recorded as the total loss (value and entropy terms
    included), and is the surrogate alone since the seventh session, as METRICS says."""
    import proxrl

    run = tmp_path / "gym"
    shutil.copytree(FIXTURES / "gym-cartpole", run)
    lines = proxrl.train(resume=str(run), steps=2048, progress="off").metrics
    got = {m["update"]: (m["value_loss"], m["approx_kl"], m["episode_return"]) for m in lines}
    assert got[3] == pytest.approx((58.18339157104492, 0.003469965187832713, 35.6), rel=1e-5)
    assert got[4] == pytest.approx((59.035770416259766, 0.0001992585603147745, 37.45454545454545), rel=1e-5)
    assert proxrl.evaluate(run, episodes=3, seed=7)["mean_return"] == pytest.approx(101.0)


@pytest.mark.parametrize("critic_lr", [None, 1e-4])  # one parameter group, and two
def test_layout_2_gym_checkpoint_resumes_identically_to_layout_3(tmp_path, critic_lr):
    """The same checkpoint written in both layouts (the one optimizer split back into actor_opt + critic_opt,
    version 2) resumes to the same weights and metrics, bit for bit."""
    import json

    import proxrl
    from safetensors.torch import load_file, save_file

    first = tmp_path / "new"
    proxrl.train(env="CartPole-v1", algo="ppo-clip", steps=1024, num_envs=4, num_steps=128, seed=5, preset="none",
                 critic_lr=critic_lr, out=str(first), progress="off")
    pol = proxrl.load(first).policy
    nets = [("actor_opt", [p.shape for p in pol.actor_parameters()]), ("critic_opt", [p.shape for p in pol.critic.parameters()])]
    old = tmp_path / "old"
    shutil.copytree(first, old)
    (ckpt,) = sorted((old / "checkpoints").glob("ckpt-*"))
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "tensors.safetensors"))
    meta = state["optimizers"].pop("optimizer")  # layout 3: one state per network (leaf 0 actor, 1 critic)
    assert len(meta["param_groups"]) == (1 if critic_lr is None else 2)
    group_of = {i: g for g in meta["param_groups"] for i in g["params"]}
    for leaf, (name, shapes) in enumerate(nets):  # layout 2: one optimizer per network, one state per layer
        group = {k: v for k, v in group_of[leaf].items() if k != "name"}
        keys = meta["keys"][str(leaf)]
        state["optimizers"][name] = {"param_groups": [{**group, "params": list(range(len(shapes)))}],
                                     "keys": {str(j): keys for j in range(len(shapes))}}
        off = 0
        for j, shape in enumerate(shapes):
            n = int(torch.Size(shape).numel())
            tensors[f"{name}/{j}/step"] = tensors[f"optimizer/{leaf}/step"].clone()
            for k in ("exp_avg", "exp_avg_sq"):
                tensors[f"{name}/{j}/{k}"] = tensors[f"optimizer/{leaf}/{k}"][off:off + n].reshape(shape).clone()
            off += n
    tensors = {k: v for k, v in tensors.items() if not k.startswith("optimizer/")}
    state["version"] = 2
    save_file(tensors, str(ckpt / "tensors.safetensors"))
    (ckpt / "state.json").write_text(json.dumps(state))
    a = proxrl.train(resume=str(first), steps=2048, progress="off").metrics
    b = proxrl.train(resume=str(old), steps=2048, progress="off").metrics
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("time", "sps")} for m in ms]  # noqa: E731
    assert strip(a) == strip(b) and a[-1]["update"] == 4
    wa = proxrl.load(first).policy.state_dict()
    wb = proxrl.load(old).policy.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_v1_lm_checkpoint_loads_into_the_trainer(tmp_path):
    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.tiny import make_tiny
    from proxrl.run import checkpoint

    tiny = make_tiny(tmp_path / "tiny", seed=0)  # the model the fixture was trained from (deterministic)
    tensors, state = checkpoint.load(FIXTURES / "lm-ppo" / "checkpoints")
    assert "version" not in state  # a version-1 checkpoint
    saved = {**state["config"], "policy": str(tiny), "prompts": "", "out": str(tmp_path / "out"), "resume": None}
    trainer = PPOTrainer(PPOConfig(**saved), reward=lambda p, r: [0.0] * len(r))
    trainer.load_checkpoint_state(tensors, state)
    assert trainer.step_count == 2
    own = trainer.policy.trainable_state()
    for k, v in own.items():
        assert torch.equal(v, tensors[f"policy.{k}"])
    rollout = trainer.generate(["prompt 1", "prompt 2", "prompt 3", "prompt 4"])
    m = trainer.step(rollout, trainer.score(rollout))  # and it trains on
    assert m["step"] == 3 and m["skipped"] is None


def test_lm_rung5_beta_uses_the_exact_kl_after_the_update(tmp_path):
    """β of the rung-5 penalty moves once per update on the exact mean per-token KL(π_old‖π_θ) over the
    vocabulary, measured after the update — computed here independently from a copy of π_old."""
    from proxrl import core
    from proxrl.lm import PPOTrainer
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.tiny import make_tiny

    tiny = make_tiny(tmp_path / "tiny", seed=0)
    cfg = PPOConfig(policy=str(tiny), out=str(tmp_path / "o"), batch_size=4, num_minibatches=2, micro_batch_size=2,
                    update_epochs=2, response_length=6, lr=3e-2, chat_template="off", surrogate="kl-penalty",
                    penalty_beta=1.0, penalty_target_kl=0.01)
    trainer = PPOTrainer(cfg, reward=lambda p, r: [float(len(x)) for x in r])
    old = copy.deepcopy(trainer.policy)
    rollout = trainer.generate(["a b", "c d", "e f", "g h"])
    m = trainer.step(rollout, trainer.score(rollout))
    ids, mask, R = rollout.ids, rollout.mask, rollout.response_ids.shape[1]
    with torch.no_grad():
        lp_old = old.log_softmax(ids, mask, R, cfg.temperature)
        lp_new = trainer.policy.log_softmax(ids, mask, R, cfg.temperature)
    kl_tok = (lp_old.exp() * (lp_old - lp_new)).sum(-1)
    rm = rollout.response_mask.to(kl_tok.dtype)
    exact = float((kl_tok * rm).sum() / rm.sum())
    assert m["kl_old_exact"] == pytest.approx(exact, rel=1e-5)
    assert exact > 0
    assert trainer.penalty_beta == core.ppo_beta_update(1.0, m["kl_old_exact"], 0.01)
    # the statistic the old code used (mean over minibatches of the KL *before* each step) is smaller:
    # its first minibatch is at θ = θ_old, where the KL is 0 by construction
    assert m["approx_kl"] < exact
