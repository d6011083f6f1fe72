"""HuggingFaceH4 ultrafeedback_binarized: ``chosen``/``rejected`` are full message lists.

Prompt = their common prefix (ending with a user turn), answers = the rest (assistant turns only);
the ``prompt`` string column is not used (the message lists are the record). Equal scores are a TIE,
quarantined unless ``options.keep_ties`` (upstream keeps such rows; a tie teaches no preference).
"""

from __future__ import annotations

from schemas.data_config import BinarizedOptions
from schemas.preference import Reason
from tasks.data.sources.base import RowError, messages, require, score, split_common_prefix, typed


def parse(record: dict, options=None, rng=None) -> dict:
    options = typed(options, BinarizedOptions)
    prompt, chosen, rejected = split_common_prefix(
        messages(require(record, "chosen", list), "chosen"), messages(require(record, "rejected", list), "rejected")
    )
    score_chosen, score_rejected = score(record, "score_chosen"), score(record, "score_rejected")
    if score_chosen is not None and score_chosen == score_rejected and not options.keep_ties:
        raise RowError(Reason.TIE, f"score_chosen == score_rejected == {score_chosen} (options.keep_ties keeps ties)")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }
