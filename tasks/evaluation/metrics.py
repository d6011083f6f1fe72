"""Evaluation statistics as pure functions (numbers in, numbers out): the one definition of each metric, read
by the evaluate stage (tasks/evaluation/stage.py) and by the training stages' held-out metrics (this module
imports numpy only, so a training stage may use it without importing the evaluate stage).

Definitions (the same ones the metric names in MLflow refer to):
- preference accuracy (``rm_accuracy``, ``dpo_accuracy``, the reward/DPO stages' held-out accuracy): share of
  pairs where the chosen answer scores above the rejected one; an exact tie counts as half (see
  ``preference_accuracy``).
- win rate vs SFT: per held-out prompt, the reward model scores the policy's and the SFT model's answer;
  a win is policy > sft + eps, a loss policy < sft - eps, anything else a tie. ``win_rate`` counts a tie
  as half a win (AlpacaEval's convention, so 0.5 means "as good as SFT"); wins, ties and losses are also
  reported separately. The confidence interval is a seeded percentile bootstrap over prompts. The same against
  the untrained base model (``win_rate_vs_base``) and the current champion (``win_rate_vs_champion``).
- length-controlled win rate (``win_rate_lc``, ``win_rate_vs_base_lc``): the win rate once the judge's
  preference for longer (or shorter) answers is regressed out of the RM margins (``length_controlled_outcomes``).
- KL(policy || reference), the one KL the pipeline reports: per token, on the policy's own samples (the token
  ids it generated for the held-out prompts, never a decode and re-encode), against the reference, exact over
  the vocabulary at each position (``tasks.training.logprobs.token_kl``). ``kl_per_token`` is its mean over
  answer tokens, ``kl_per_sequence`` the mean over answers of its sum (``kl_summary``). Along greedy answers it
  is a KL on the policy's likely paths, not a Monte-Carlo estimate of the sequence-level KL.
- refusal: a keyword/regex classifier (``REFUSAL_PATTERNS``). Limits: it matches phrasing, not intent —
  a refusal worded unusually counts as compliance, and an answer that apologises and then complies
  counts as a refusal; it only knows English. It is a tally to compare two models on the same prompts,
  not a safety verdict.
"""

from __future__ import annotations

import re

import numpy as np

REFUSAL_PATTERNS = [
    r"\bI(?:'m| am)? (?:sorry|afraid)\b",
    r"\bI (?:can(?:'|no)t|cannot|won't|will not|am not able to|'m not able to|am unable to|'m unable to)\b",
    r"\b(?:can(?:'|no)t|cannot|won't|will not|unable to) (?:help|assist|do that|provide|share|comply)",
    r"\bnot (?:able|allowed|comfortable) to\b",
    r"\b(?:is|would be|that's) (?:illegal|unethical|harmful|not appropriate|inappropriate)\b",
    r"\bas an ai\b",
    r"\bI (?:must|have to) (?:decline|refuse)\b",
]
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """True when the answer reads as a refusal (see the module note for what this cannot tell)."""
    return bool(_REFUSAL.search(text.replace("’", "'")))


def refusal_rate(texts: list[str]) -> float:
    return float(np.mean([is_refusal(t) for t in texts])) if texts else float("nan")


def preference_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs where the chosen answer scores higher; an exact tie counts as half a correct pair.

    Why half: a tie carries no preference, and half is the expected score of breaking it by a coin, so a scorer
    that cannot tell the sides apart scores 0.5 (chance) instead of 0. The untrained DPO policy (pi == ref, every
    implicit reward 0) then reads 0.5 at step 0, and the rule matches the win rate's (a tie is half a win).
    Counting ties as wrong would report a scorer that says nothing as worse than chance. TRL's per-step
    ``rewards/accuracies`` (DPO) and ``accuracy`` (reward model) count ties as wrong: on tied pairs they read lower.
    """
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"preference_accuracy: need equal, non-empty score lists (got {c.size} and {r.size})")
    return float(np.mean((c > r) + 0.5 * (c == r)))


def win_outcomes(policy: list[float], reference: list[float], tie_epsilon: float = 1e-6) -> np.ndarray:
    """Per prompt: +1 policy wins, 0 tie (|difference| <= tie_epsilon), -1 policy loses."""
    p, r = np.asarray(policy, dtype=float), np.asarray(reference, dtype=float)
    if p.shape != r.shape or p.size == 0:
        raise ValueError(f"win_outcomes: need equal, non-empty score lists (got {p.size} and {r.size})")
    d = p - r
    return np.where(d > tie_epsilon, 1, np.where(d < -tie_epsilon, -1, 0))


def length_controlled_outcomes(
    policy: list[float],
    reference: list[float],
    policy_len: list[int],
    reference_len: list[int],
    tie_epsilon: float = 1e-6,
) -> np.ndarray:
    """``win_outcomes`` with the judge's length preference regressed out. The RM margin ``d = policy - reference``
    is fitted by least squares as ``d = a + b * dlen`` (``dlen``: policy minus reference answer length, in tokens)
    and each prompt's outcome is the sign of ``d - b * dlen``: the margin the policy would have had at the
    reference's length. A policy that wins only by answering longer under a length-loving judge reads ~0.5 here.
    No length variation (every ``dlen`` equal) leaves nothing to regress: ``b = 0``, the raw outcomes."""
    p, r = np.asarray(policy, dtype=float), np.asarray(reference, dtype=float)
    lp, lr = np.asarray(policy_len, dtype=float), np.asarray(reference_len, dtype=float)
    if not (p.shape == r.shape == lp.shape == lr.shape) or p.size == 0:
        raise ValueError(
            f"length_controlled_outcomes: need equal, non-empty lists (got {p.size}, {r.size}, {lp.size}, {lr.size})"
        )
    d, dlen = p - r, lp - lr
    centred = dlen - dlen.mean()
    var = float((centred**2).sum())
    slope = float((centred * (d - d.mean())).sum() / var) if var > 0 else 0.0
    adjusted = d - slope * dlen
    return np.where(adjusted > tie_epsilon, 1, np.where(adjusted < -tie_epsilon, -1, 0))


def _win_rate(outcomes: np.ndarray) -> np.ndarray:
    """Win rate with ties as half a win, along the last axis."""
    return (outcomes > 0).mean(axis=-1) + 0.5 * (outcomes == 0).mean(axis=-1)


def win_rate_summary(
    outcomes: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Win/tie/loss rates and a percentile-bootstrap CI of the win rate (prompts resampled, seeded)."""
    o = np.asarray(outcomes)
    rng = np.random.default_rng(seed)
    boot = _win_rate(o[rng.integers(0, o.size, size=(n_boot, o.size))])
    alpha = (1 - confidence) / 2
    return {
        "win_rate": float(_win_rate(o)),
        "win_rate_ci_low": float(np.quantile(boot, alpha)),
        "win_rate_ci_high": float(np.quantile(boot, 1 - alpha)),
        "wins": float((o > 0).mean()),
        "ties": float((o == 0).mean()),
        "losses": float((o < 0).mean()),
        "n_prompts": float(o.size),
    }


def kl_summary(kl_sums: list[float], tokens: list[int]) -> dict[str, float]:
    """``kl_per_token`` (total KL / total answer tokens) and ``kl_per_sequence`` (mean per-answer sum) from each
    answer's summed per-token KL and its token count; answers with no tokens (nothing generated) are left out."""
    k, n = np.asarray(kl_sums, dtype=float), np.asarray(tokens, dtype=float)
    if k.shape != n.shape or n.sum() == 0:
        raise ValueError(f"kl_summary: no answer tokens to average over ({n.size} answers, {int(n.sum())} tokens)")
    return {"kl_per_token": float(k.sum() / n.sum()), "kl_per_sequence": float(k[n > 0].mean())}


def share(flags: list[bool]) -> float:
    """Fraction of True (e.g. answers cut at ``max_new_tokens``); NaN for no items."""
    return float(np.mean(flags)) if len(flags) else float("nan")


def length_stats(lengths: list[int], prefix: str) -> dict[str, float]:
    """Mean, median, 90th percentile and max of answer lengths (length hacking shows up here)."""
    a = np.asarray(lengths, dtype=float)
    if a.size == 0:
        return {}
    return {
        f"{prefix}_mean": float(a.mean()),
        f"{prefix}_median": float(np.median(a)),
        f"{prefix}_p90": float(np.quantile(a, 0.9)),
        f"{prefix}_max": float(a.max()),
    }
