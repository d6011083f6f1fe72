"""Evaluation statistics as pure functions (numpy/torch in, numbers out); tasks/evaluate.py feeds them.

Definitions (the same ones the metric names in MLflow refer to):
- win rate vs SFT: per held-out prompt, the reward model scores the policy's and the SFT model's answer;
  a win is policy > sft + eps, a loss policy < sft - eps, anything else a tie. ``win_rate`` counts a tie
  as half a win (AlpacaEval's convention, so 0.5 means "as good as SFT"); wins, ties and losses are also
  reported separately. The confidence interval is a seeded percentile bootstrap over prompts.
- KL(policy || reference): at every position of the policy's own answer, the exact KL between the two
  next-token distributions over the whole vocabulary, sum_v p(v) log p(v)/q(v). ``kl_per_token`` is its
  mean over answer tokens, ``kl_per_sequence`` the mean over prompts of its sum over the answer. Exact
  per position (no sampling noise); along greedy answers it is a KL on the policy's likely paths, not a
  Monte-Carlo estimate of the sequence-level KL.
- refusal: a keyword/regex classifier (``REFUSAL_PATTERNS``). Limits: it matches phrasing, not intent —
  a refusal worded unusually counts as compliance, and an answer that apologises and then complies
  counts as a refusal; it only knows English. It is a tally to compare two models on the same prompts,
  not a safety verdict.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where tensors come in: tasks/evaluate.py imports this module on reuse too
    import torch

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
    """Share of pairs where the chosen answer scores strictly higher (a tie counts as wrong)."""
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"preference_accuracy: need equal, non-empty score lists (got {c.size} and {r.size})")
    return float(np.mean(c > r))


def win_outcomes(policy: list[float], reference: list[float], tie_epsilon: float = 1e-6) -> np.ndarray:
    """Per prompt: +1 policy wins, 0 tie (|difference| <= tie_epsilon), -1 policy loses."""
    p, r = np.asarray(policy, dtype=float), np.asarray(reference, dtype=float)
    if p.shape != r.shape or p.size == 0:
        raise ValueError(f"win_outcomes: need equal, non-empty score lists (got {p.size} and {r.size})")
    d = p - r
    return np.where(d > tie_epsilon, 1, np.where(d < -tie_epsilon, -1, 0))


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


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Exact per-position KL(policy || ref) over the vocabulary; mask marks answer positions.

    Shapes: logits ``[batch, positions, vocab]``, mask ``[batch, positions]`` (1 = answer token).
    Returns (mean over masked tokens, mean over sequences of the per-sequence sum).
    """
    per_seq, n_tokens = token_kl_sums(policy_logits, ref_logits, mask)
    if n_tokens.sum() == 0:
        raise ValueError("token_kl: the mask selects no answer tokens")
    return float(per_seq.sum() / n_tokens.sum()), float(per_seq.mean())


def token_kl_sums(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed per-position KL over masked positions, and the masked token count
    (batches of any size combine exactly: total KL / total tokens)."""
    import torch

    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return kl.sum(-1), mask.sum(-1)


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
