"""Issue 5, guarantee 7: a long run's memory stays flat.

ppo-clip on CartPole trains in a child process that reads its own resident set size from /proc/self/statm
after a warm-up and at the end (no psutil); the growth over the remaining updates is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = textwrap.dedent("""
    import json, os, sys
    import proxrl
    from proxrl.gym import trainer

    PAGE = os.sysconf("SC_PAGE_SIZE")
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2 ** 20

    warmup, updates, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    samples = {}
    real = trainer.post_update_diagnostics
    count = [0]
    def spy(*a, **k):  # called once per update: sample RSS after the warm-up and at the last update
        count[0] += 1
        if count[0] in (warmup, updates):
            samples[count[0]] = rss_mb()
        return real(*a, **k)
    trainer.post_update_diagnostics = spy
    proxrl.train(env="CartPole-v1", algo="ppo-clip", preset="none", num_envs=4, num_steps=16, num_minibatches=1,
                 update_epochs=1, steps=updates * 64, seed=0, out=out, progress="off", checkpoint_every=50)
    print(json.dumps({"warmup_mb": samples[warmup], "end_mb": samples[updates], "updates": count[0]}))
""")


def measure(tmp_path, warmup: int, updates: int) -> dict:
    script = tmp_path / "mem.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(script), str(warmup), str(updates), str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_rss_flat_over_200_updates(tmp_path):
    r = measure(tmp_path, warmup=50, updates=250)
    growth = r["end_mb"] - r["warmup_mb"]
    print(f"\nRSS after 50 updates {r['warmup_mb']:.1f} MB, after 250 {r['end_mb']:.1f} MB: growth {growth:+.2f} MB")
    assert r["updates"] == 250
    assert growth < 20.0, r


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_rss_flat_over_3000_updates(tmp_path):
    r = measure(tmp_path, warmup=100, updates=3100)
    growth = r["end_mb"] - r["warmup_mb"]
    print(f"\nRSS after 100 updates {r['warmup_mb']:.1f} MB, after 3100 {r['end_mb']:.1f} MB: growth {growth:+.2f} MB")
    assert growth < 20.0, r
