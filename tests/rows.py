"""Small builders of canonical rows for tests (tests/ is not a package: import as `from rows import ...`)."""

from __future__ import annotations

import pyarrow as pa

from schemas.preference import PREFERENCE_SCHEMA, content_id, prompt_hash


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def row(
    prompt: str | list[dict], chosen: str, rejected: str, source: str = "s", source_row: int = 0, **scores
) -> dict:
    p = [msg("user", prompt)] if isinstance(prompt, str) else prompt
    c, r = [msg("assistant", chosen)], [msg("assistant", rejected)]
    return {
        "id": content_id(p, c, r),
        "source": source,
        "source_row": source_row,
        "prompt": p,
        "chosen": c,
        "rejected": r,
        "score_chosen": scores.get("score_chosen"),
        "score_rejected": scores.get("score_rejected"),
        "prompt_hash": prompt_hash(p),
    }


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)
