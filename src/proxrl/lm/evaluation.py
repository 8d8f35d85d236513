"""Paired before/after evaluation of a policy on held-out prompts, as the RLHF demo reports it.

The question a demo must answer is "did training change the reward?", and one batch of a few prompts
cannot answer it (issue 13: 16 prompts, one sample each, a standard error near 0.1). So:

* **the same sampling streams before and after** (common random numbers): sample k of every held-out
  prompt is drawn with the seed ``seed + k``, all prompts in one batch of the same layout, before and after
  training. :class:`~proxrl.lm.model.InverseCDFSampler` draws one uniform per row per step, so row i at step
  t gets the same uniform both times: where the policy did not change, the same tokens come out, and the
  before/after difference of a prompt measures the policy's change, not sampling luck;
* **several samples per prompt** (K), averaged per prompt;
* **paired statistics**: per-prompt differences d_i = mean_k after − mean_k before; the improvement is
  mean(d), its standard error std(d) / √n (n prompts, sample std, ddof=1) — the paired-t standard error;
* **the responses stay language**: KL to the reference (k1, per sequence, at the sampling temperature, as
  the PPO controller measures it), the reference model's per-token NLL of the responses (at temperature
  1: its own distribution), and repetition (share of repeated word 3-grams within a response; distinct-n
  across responses).

The statistics and the repetition measures are pure functions (``tests/test_lm_evaluation.py``); the
sampling and the forwards use the public pieces of :class:`~proxrl.lm.ppo_trainer.PPOTrainer` and
:class:`~proxrl.lm.model.LMPolicy`.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Optional, Sequence

_WORD = re.compile(r"\w+")


# --------------------------------------------------------------------------- statistics (pure)
def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if len(xs) else float("nan")


def std_error(xs: Sequence[float]) -> float:
    """Standard error of the mean of ``xs``: sample std (ddof=1) / √n; NaN below two values."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1) / n)


def paired_stats(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> dict:
    """Paired comparison of scores ``before[i][k]`` / ``after[i][k]`` (prompt i, sample k; the same K for
    every prompt, the same prompts and sampling streams both times).

    Returns ``before``/``after`` (means over prompts of the per-prompt means), ``delta`` = mean of the
    per-prompt differences, ``delta_se`` = their sample std / √n, ``ratio`` = delta / delta_se (±inf when
    the differences are all equal and non-zero, NaN when they are all zero or n < 2), ``before_se`` /
    ``after_se`` (standard errors of the two means on their own, for error bars), and the per-prompt means.
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} prompts before, {len(after)} after")
    if not before:
        raise ValueError("no prompts")
    ks = {len(row) for row in before} | {len(row) for row in after}
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"every prompt needs the same number (≥ 1) of samples before and after, got {sorted(ks)}")
    per_before = [mean(row) for row in before]
    per_after = [mean(row) for row in after]
    diffs = [a - b for a, b in zip(per_after, per_before)]
    delta, se = mean(diffs), std_error(diffs)
    if se > 0:
        ratio = delta / se
    elif se == 0 and delta != 0:
        ratio = math.copysign(math.inf, delta)
    else:
        ratio = float("nan")
    return {"n_prompts": len(before), "samples_per_prompt": ks.pop(),
            "before": mean(per_before), "after": mean(per_after), "delta": delta, "delta_se": se, "ratio": ratio,
            "before_se": std_error(per_before), "after_se": std_error(per_after),
            "per_prompt_before": per_before, "per_prompt_after": per_after}


# --------------------------------------------------------------------------- degeneration (pure)
def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits, underscore); punctuation and spaces dropped."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` that already occurred earlier in it: 0 for text that never
    repeats itself, → 1 for a loop ("great great great …"); 0 when it has fewer than n words."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (Li et al. 2016, "distinct-n"): falls when
    the responses collapse onto the same phrases. NaN when there is no n-gram at all."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def degeneration(texts: Sequence[str]) -> dict:
    """Repetition within responses (mean share of repeated word 3-grams; share of responses where at least
    half the 3-grams repeat) and diversity across them (distinct-1, distinct-2), plus the mean word count."""
    rep = [repeated_ngram_fraction(t, 3) for t in texts]
    return {"repeated_3gram_fraction": mean(rep), "looping_fraction": mean([float(r >= 0.5) for r in rep]),
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "words_per_response": mean([float(len(words(t))) for t in texts])}


# --------------------------------------------------------------------------- sampling and forwards
def generate_eval(trainer, prompts: Sequence[str], samples: int, seed: int,
                  progress: Optional[Callable[[int], None]] = None) -> list:
    """``samples`` rollouts of all ``prompts`` (one ``trainer.generate`` call each, seed ``seed + k``, the
    prompts in the given order): row i of rollout k is sample k of prompt i, drawn from the same uniforms
    whenever the prompts, K and seed are the same (see the module docstring)."""
    out = []
    for k in range(samples):
        out.append(trainer.rollouts.generate(list(prompts), seed + k))  # the policy itself (never a lagged sampler)
        if progress is not None:
            progress(k + 1)
    return out


def score_eval(scorer: Callable, rollouts: Sequence) -> list[list[float]]:
    """``scores[i][k]`` of prompt i, sample k, for a ``Scorer`` (rollout → ``[B]`` tensor)."""
    per_k = [scorer(r, " on the held-out prompts").tolist() for r in rollouts]
    return [list(row) for row in zip(*per_k)]


def ref_token_logp(policy, ids, mask, n_resp: int, temperatures: Sequence[float]) -> list:
    """The reference model's log-probs of the response tokens at each of ``temperatures`` from ONE forward
    (:meth:`LMPolicy.ref_logp` does one forward per temperature). Same reference as ``ref_logp``: the base
    with the LoRA adapter disabled, or the frozen copy."""
    from .policy import forward, token_logp

    if policy.is_lora:
        ctx, model = policy.lm.disable_adapter(), policy.lm
    else:
        ctx, model = contextlib.nullcontext(), policy.ref_lm
    with ctx:
        logits, _ = forward(model, ids, mask, n_resp + 1)
    logits, tokens = logits[:, :-1], ids[:, -n_resp:]  # [B, R, V], [B, R]
    return [token_logp(logits, tokens, t) for t in temperatures]


def token_stats(policy, rollouts: Sequence, temperature: float, chunk: int, kl: bool = True) -> dict:
    """Over all responses of ``rollouts``: ``kl_ref`` = mean per-sequence Σ_t (logp − logp_ref) at the
    sampling ``temperature`` (k1, as PPO logs it; only when ``kl``), ``ref_nll`` = the reference model's
    −log p per response token at temperature 1 (token-weighted over all responses), the mean response
    length in tokens and the share that stopped."""
    import torch

    kl_seq, nll_sum, n_tok, lengths, stopped = [], 0.0, 0.0, [], []
    dev = next(policy.parameters()).device
    with torch.inference_mode():
        for r in rollouts:
            ids, mask, R = r.ids.to(dev), r.mask.to(dev), r.response_ids.shape[1]
            m = r.response_mask.to(dev)
            for i in range(0, len(r), chunk):
                sl = slice(i, i + chunk)
                lp_ref_t, lp_ref_1 = ref_token_logp(policy, ids[sl], mask[sl], R, [temperature, 1.0])
                mm = m[sl].to(lp_ref_1.dtype)
                nll_sum += float(-(lp_ref_1 * mm).sum().double())
                n_tok += float(mm.sum())
                if kl:
                    lp, _, _ = policy(ids[sl], mask[sl], R, temperature, values=False, entropy=False)
                    kl_seq += ((lp - lp_ref_t) * mm).sum(-1).double().tolist()
            lengths += r.response_mask.sum(-1).double().tolist()
            stopped += r.stopped.double().tolist()
    return {"kl_ref": mean(kl_seq) if kl else None, "ref_nll": nll_sum / n_tok if n_tok else float("nan"),
            "response_tokens": mean(lengths), "eos_rate": mean(stopped)}
