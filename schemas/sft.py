"""The canonical SFT row: TRL's conversational ``messages`` format, ending with the assistant's answer.

Written by ``format: sft`` sources (``messages``, ShareGPT ``conversations``, ``prompt`` + ``completion``, alpaca)
and by the CAI stage (its accepted revisions). ``id`` hashes the exact message list (the dedupe key);
``prompt_hash`` hashes every turn before the answer, normalised (the decontamination key). The split key, as for
every table, is the normalised first user turn (``tasks/data/split.py``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, field_validator

from schemas.preference import MESSAGES, SCHEMA_VERSION, Message, messages_id

SFT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("messages", MESSAGES, nullable=False),
        pa.field("prompt_hash", pa.string(), nullable=False),
    ],
    metadata={"align.schema_version": SCHEMA_VERSION},
)


class SFTRow(BaseModel):
    """Row model of :data:`SFT_SCHEMA` (the pyarrow schema is what is written)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    source_row: int
    messages: list[Message]
    prompt_hash: str

    @field_validator("messages")
    @classmethod
    def check_ends_with_answer(cls, v: list[Message]) -> list[Message]:
        if len(v) < 2 or v[-1].role != "assistant" or v[-2].role != "user":
            raise ValueError("messages must end with a user turn and then the assistant's answer")
        return v


def sft_id(messages: list[dict]) -> str:
    """Content id of an SFT row: hash of its exact message list."""
    return messages_id(messages)


def sft_prompt(messages: list[dict]) -> list[dict]:
    """The turns before the answer (the prompt the answer is trained on)."""
    return list(messages[:-1])


def without_last_turn(messages: pa.ListArray) -> pa.ListArray:
    """:func:`sft_prompt` of every row of a ``MESSAGES`` array: each list minus its last turn (a null list: none)."""
    lengths = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = messages.flatten()
    keep = np.ones(len(flat), dtype=bool)
    ends = np.cumsum(lengths)
    keep[ends[lengths > 0] - 1] = False
    offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat.filter(pa.array(keep)), type=MESSAGES)
