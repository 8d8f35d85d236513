"""`proxrl ladder --lm`: every rung × seed on one LM task, compared in ladder.md / ladder.json / ladder.png;
every run's config checked before the first one starts."""

import json

import pytest

pytest.importorskip("transformers")

from proxrl.cli import main  # noqa: E402
from proxrl.lm.data import write_jsonl  # noqa: E402
from proxrl.lm.tiny import make_tiny  # noqa: E402

REWARD = '''
def letters(prompts, responses):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def broken(prompts, responses):
    raise RuntimeError("no scorer")
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    model = make_tiny(d / "m")
    write_jsonl(d / "p.jsonl", [{"prompt": f"say {i}:"} for i in range(12)])
    (d / "reward.py").write_text(REWARD)
    return ["--policy", str(model), "--reward", f"{d / 'reward.py'}:letters", "--prompts", str(d / "p.jsonl"),
            "--batch-size", "8", "--micro-batch-size", "8", "--response-length", "4", "--eval-prompts", "2",
            "--finetune", "full", "--lr", "1e-2"]


def test_ladder_lm_runs_every_rung_and_writes_the_comparison(task, tmp_path, capsys):
    out = tmp_path / "lad"
    rc = main(["ladder", "--lm", *task, "--algos", "pg", "grpo", "is-pg", "--seeds", "2", "--updates", "3",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["ladder_md"] == str(out / "ladder.md")
    assert "ladder: run 6/6: is-pg seed 1" in captured.err
    md = (out / "ladder.md").read_text()
    for algo in ("pg", "grpo", "is-pg"):
        assert f"| `{algo}` |" in md
        for seed in (0, 1):
            assert len((out / algo / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()) == 3
    data = json.loads((out / "ladder.json").read_text())
    rows = {r["algo"]: r for r in data["rungs"]}
    assert rows["is-pg"]["max_is_weight_var"] is not None and rows["pg"]["max_is_weight_var"] is None
    assert all(r["s_per_update"] > 0 and r["s_per_1k_tokens"] > 0 and r["seeds"] == 2 for r in rows.values())
    assert (out / "ladder.png").stat().st_size > 10_000
    rc = main(["ladder", "--lm", *task, "--algos", "pg", "--updates", "3", "--out", str(out)])
    assert rc == 2 and "already holds ladder runs" in capsys.readouterr().err


@pytest.mark.parametrize("extra,field", [
    (["--algos", "pg", "nope"], "algos"),
    (["--algos", "pg", "rloo", "--batch-size", "6"], "samples_per_prompt"),  # rloo's K = 4 must divide 6
    (["--seeds", "0"], "seeds"),
    (["--algos", "pg", "rloo", "pg"], "algos"),  # two runs in pg/seed0: the second replaced or refused after the first
])
def test_ladder_lm_refuses_before_any_run(task, tmp_path, capsys, extra, field):
    out = tmp_path / "bad"
    rc = main(["ladder", "--lm", *task, *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {field}:"), err
    assert not (out / "pg").exists()


def test_a_new_ladder_removes_the_older_summary_before_its_runs(task, tmp_path, capsys):
    """A ladder that fails part-way never leaves an older ladder's table and figure beside its new runs."""
    out = tmp_path / "lad"
    assert main(["ladder", "--lm", *task, "--algos", "pg", "--updates", "2", "--out", str(out)]) == 0
    assert all((out / f"ladder.{x}").exists() for x in ("md", "json", "png"))
    failing = [a.replace(":letters", ":broken") for a in task]
    rc = main(["ladder", "--lm", *failing, "--algos", "pg", "--updates", "2", "--out", str(out), "--overwrite"])
    assert rc == 2 and "no scorer" in capsys.readouterr().err
    assert not any((out / f"ladder.{x}").exists() for x in ("md", "json", "png"))


def test_ladder_lm_seed_is_the_first_seed_of_every_rung(task, tmp_path, capsys):
    """`--seed` (shown in the help as the seed of sampling, shuffling and initialisation) was accepted and ignored:
    the runs were seeds 0 … seeds − 1 whatever it said, while ladder.json recorded it."""
    out = tmp_path / "lad"
    assert main(["ladder", "--lm", *task, "--algos", "pg", "--seed", "3", "--seeds", "2", "--updates", "1",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "pg").iterdir()) == ["seed3", "seed4"]
    for k in (3, 4):
        assert json.loads((out / "pg" / f"seed{k}" / "config.json").read_text())["config"]["seed"] == k
    assert [r["seed"] for r in json.loads((out / "ladder.json").read_text())["runs"]] == [3, 4]


def test_a_ladder_stopped_by_a_signal_says_the_ladder_did_not_finish(task, tmp_path, capsys, monkeypatch):
    """SIGINT in a ladder's run: the run's own line ("resume with: proxrl rlhf train --resume <run>") continues
    that run only; the line also says the ladder stopped at which run, wrote no table and has no --resume."""
    import signal
    from pathlib import Path

    from proxrl.lm import ppo_trainer
    from proxrl.run.signals import RunInterrupted

    def stopped(rc, log):
        raise RunInterrupted(signal.SIGINT, Path(rc.out), 2, "proxrl rlhf train", " --reward r.py:f")

    monkeypatch.setattr(ppo_trainer, "train", stopped)
    out = tmp_path / "lad"
    rc = main(["ladder", "--lm", *task, "--algos", "pg", "rloo", "--updates", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1].startswith("stopped: stopped by SIGINT after update 2"), err
    assert "the ladder stopped at run 1/2 (pg seed 0) and wrote no ladder.md" in err[-1]
    assert "has no --resume" in err[-1] and "\n" not in err[-1]


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_ladder_lm_out_that_is_itself_a_run_is_said_so(task, tmp_path, capsys, extra):
    """Before: 'already holds a run (continue it with --resume …, replace it with --overwrite …)': the ladder has
    no --resume, and with --overwrite it refused again with the same line."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    rc = main(["ladder", "--lm", *task, "--algos", "pg", "--updates", "1", *extra, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: out:") and "itself a run directory" in err[0], err
    assert "--resume" not in err[0] and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
