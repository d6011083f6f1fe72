"""Intel orca_dpo_pairs: ``system`` (when a non-empty string) + ``question`` → prompt; ``chosen`` /
``rejected`` → one assistant turn each. Byte-exact: upstream rejected answers start with a space, kept."""

from __future__ import annotations

from tasks.data.sources.base import assistant, optional_str, require_str, user


def parse(record: dict, options=None, rng=None) -> dict:
    system = optional_str(record, "system")  # absent, null and "" all mean "no system turn"
    prompt = [{"role": "system", "content": system}] if system else []
    prompt.append(user(require_str(record, "question")))
    return {
        "prompt": prompt,
        "chosen": [assistant(require_str(record, "chosen"))],
        "rejected": [assistant(require_str(record, "rejected"))],
        "score_chosen": None,
        "score_rejected": None,
    }
