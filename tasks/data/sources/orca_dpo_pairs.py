"""Intel orca_dpo_pairs: ``system`` (when a non-empty string) + ``question`` → prompt; ``chosen`` /
``rejected`` → one assistant turn each. Byte-exact by default: upstream every rejected answer starts with
a space and no chosen one does (the data contract warns about it, per source); ``options.strip_answer_edges``
strips whitespace at both ends of both answers, so that the sides no longer differ by it."""

from __future__ import annotations

from schemas.data_config import OrcaOptions
from tasks.data.sources.base import assistant, optional_str, require_str, typed, user


def parse(record: dict, options=None, rng=None) -> dict:
    system = optional_str(record, "system")  # absent, null and "" all mean "no system turn"
    prompt = [{"role": "system", "content": system}] if system else []
    prompt.append(user(require_str(record, "question")))
    chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    if typed(options, OrcaOptions).strip_answer_edges:
        chosen, rejected = chosen.strip(), rejected.strip()
    return {
        "prompt": prompt,
        "chosen": [assistant(chosen)],
        "rejected": [assistant(rejected)],
        "score_chosen": None,
        "score_rejected": None,
    }
