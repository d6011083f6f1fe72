"""``format: unpaired``: unpaired feedback (a thumbs up or down on one answer) → canonical unpaired rows
(``schemas/unpaired.py``), TRL's unpaired preference format, shape detected per row:

1. TRL: ``prompt`` (a string → one user turn, or messages) + ``completion`` (a string → one assistant turn, or
   assistant messages) + ``label``.
2. ``messages`` + ``label``: the last turn is the completion (it must be the assistant's), the turns before it the
   prompt.

``label`` must be a JSON boolean (true = desirable): a missing label is MISSING_FIELD, a number or a string
("yes", 1) is WRONG_TYPE, never guessed. An empty completion is quarantined by cleaning (empty turn).
"""

from __future__ import annotations

from schemas.preference import Reason
from tasks.data.sources.base import RowError, assistant, check_answer, check_prompt, messages, require, turns, user

SHAPES = ("prompt/completion/label (TRL)", "messages/label")


def parse(record: dict, options=None, rng=None) -> dict:
    if "completion" in record or "prompt" in record:
        prompt, completion = turns(record, "prompt", user), turns(record, "completion", assistant)
        for key, value in (("prompt", prompt), ("completion", completion)):
            if value is None:
                raise RowError(Reason.MISSING_FIELD, f"missing field {key!r} (found keys: {sorted(record)})")
    elif "messages" in record:
        conversation = messages(record["messages"], "messages")
        if not conversation or conversation[-1]["role"] != "assistant":
            last = conversation[-1]["role"] if conversation else "nothing"
            raise RowError(
                Reason.BAD_TURN_ORDER, f"messages: the last turn is the completion, an assistant turn; found {last}"
            )
        prompt, completion = conversation[:-1], conversation[-1:]
    else:
        raise RowError(
            Reason.MISSING_FIELD,
            f"no unpaired row; expected one of: {'; '.join(SHAPES)} (found keys: {sorted(record)})",
        )
    check_prompt(prompt)
    check_answer(completion, "completion")
    return {"prompt": prompt, "completion": completion, "label": require(record, "label", bool)}
