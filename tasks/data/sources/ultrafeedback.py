"""OpenBMB UltraFeedback (raw): one instruction, several scored completions → one pair.

Score per completion (``options.score``):
- ``mean_rating`` (default): mean of the four aspect ``Rating`` strings (helpfulness, honesty,
  instruction_following, truthfulness); "N/A" and missing ratings are left out of the mean; a
  completion with no numeric rating is unscored. HuggingFaceH4/ultrafeedback_binarized uses the same.
- ``overall_score``: the float; missing, null or NaN → unscored. Upstream it has a known bug (some
  critique scores of 1 became 10, so a poor completion can rank first): use it only to reproduce.
Chosen = the highest score; if several share it, the first in the source's order (a shared top is
fine while a strictly lower completion exists). Rejected (``options.rejected``): ``random`` = a seeded
choice among the completions scored strictly lower (the rng is seeded per row, so the pick does not
depend on order or chunking), ``lowest`` = the lowest (first in order on a tie). Fewer than two scored
completions → TOO_FEW_COMPLETIONS; all scored completions equal → TIE. The prompt is the instruction
alone: ``custom_system_prompt`` belongs to one completion's generation, not to the shared prompt.
"""

from __future__ import annotations

import math

from schemas.data_config import UltraFeedbackOptions
from schemas.preference import Reason
from tasks.data.sources.base import (
    RowError,
    assistant,
    require,
    require_str,
    score,
    type_name,
    typed,
    user,
    wrong_type,
)

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def mean_rating(completion: dict, field: str) -> float | None:
    annotations = completion.get("annotations")
    if annotations is None:
        return None
    if not isinstance(annotations, dict):
        raise wrong_type(f"{field}.annotations", "object", annotations)
    ratings = []
    for aspect in ASPECTS:
        annotation = annotations.get(aspect)
        if annotation is None:
            continue
        if not isinstance(annotation, dict):
            raise wrong_type(f"{field}.annotations.{aspect}", "object", annotation)
        rating = _rating(annotation.get("Rating"), f"{field}.annotations.{aspect}.Rating")
        if rating is not None:
            ratings.append(rating)
    return sum(ratings) / len(ratings) if ratings else None


def _rating(value, field: str) -> float | None:
    if value is None or value == "N/A":
        return None
    if isinstance(value, str):
        try:
            rating = float(value)
        except ValueError:
            raise RowError(Reason.WRONG_TYPE, f"{field}: expected a number or 'N/A', found {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        rating = float(value)
    else:
        raise RowError(Reason.WRONG_TYPE, f"{field}: expected a number or 'N/A', found {type_name(value)}")
    return None if math.isnan(rating) else rating


def parse(record: dict, options=None, rng=None) -> dict:
    options = typed(options, UltraFeedbackOptions)
    instruction = require_str(record, "instruction")
    completions = require(record, "completions", list)
    scored = []  # (score, response), in source order
    for i, completion in enumerate(completions):
        field = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise wrong_type(field, "object", completion)
        if options.score == "overall_score":
            value = score(completion, "overall_score", f"{field}.overall_score")
        else:
            value = mean_rating(completion, field)
        if value is not None:
            scored.append((value, require_str(completion, "response", f"{field}.response")))
    if len(scored) < 2:
        raise RowError(
            Reason.TOO_FEW_COMPLETIONS,
            f"{len(scored)} of {len(completions)} completions have a score ({options.score}); a pair needs 2",
        )
    top = max(s for s, _ in scored)
    chosen = next(c for c in scored if c[0] == top)
    lower = [c for c in scored if c[0] < top]
    if not lower:
        raise RowError(Reason.TIE, f"all {len(scored)} scored completions tie at {options.score} {top}")
    if options.rejected == "lowest":
        rejected = min(lower, key=lambda c: c[0])
    elif rng is None:
        raise ValueError("ultrafeedback with options.rejected='random' needs the per-row rng (read_source passes it)")
    else:
        rejected = rng.choice(lower)
    return {
        "prompt": [user(instruction)],
        "chosen": [assistant(chosen[1])],
        "rejected": [assistant(rejected[1])],
        "score_chosen": chosen[0],
        "score_rejected": rejected[0],
    }
