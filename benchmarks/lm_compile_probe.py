"""Does ``torch.compile`` pay for the tiny LM of ``benchmarks/trl_compare.py`` on CPU? Times, in one process,
1 thread: the sampler's 16-token generation of 16 rows and a training forward/backward, eager and through
``torch.compile(model, dynamic=True)``, with the compile time of each (the first call).

    python benchmarks/lm_compile_probe.py
"""
import time, statistics, sys, tempfile, torch
torch.set_num_threads(1)
from proxrl.lm.tiny import make_tiny
from proxrl.lm.loading import load_causal_lm
from proxrl.lm.sampling import sample
d = tempfile.mkdtemp()
path = make_tiny(d + "/t", hidden=64, seed=0)
model = load_causal_lm(str(path)).eval()
B, P = 16, 24
ids = torch.randint(3, 250, (B, P)); mask = torch.ones_like(ids)
g = torch.Generator().manual_seed(0)
def gen(m):
    return sample(m, ids, mask, 16, 1.0, [2], 0, g)
def timeit(fn, n=20):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
gen(model)
print("eager generate 16 tokens: %.1f ms" % (1e3 * timeit(lambda: gen(model))), flush=True)
# training fwd+bwd
from proxrl.lm.policy import forward
def train_step(m):
    logits, _ = forward(m, ids, mask, 16)
    logits.float().logsumexp(-1).mean().backward()
print("eager fwd+bwd: %.1f ms" % (1e3 * timeit(lambda: train_step(model))), flush=True)
t0 = time.perf_counter()
cm = torch.compile(model, dynamic=True)
try:
    gen(cm)
    print("compile (first generate): %.1f s" % (time.perf_counter() - t0), flush=True)
    gen(cm)
    print("compiled generate: %.1f ms" % (1e3 * timeit(lambda: gen(cm))), flush=True)
except Exception as e:
    print("compile failed:", type(e).__name__, str(e)[:300])
t0 = time.perf_counter()
try:
    train_step(cm)
    print("compile (first fwd+bwd): %.1f s" % (time.perf_counter() - t0), flush=True)
    print("compiled fwd+bwd: %.1f ms" % (1e3 * timeit(lambda: train_step(cm))), flush=True)
except Exception as e:
    print("compile train failed:", type(e).__name__, str(e)[:300])
