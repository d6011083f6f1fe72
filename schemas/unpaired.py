"""The canonical unpaired row: TRL's unpaired preference format (``prompt``, ``completion``, ``label``), for KTO.

Written by ``format: unpaired`` sources (``prompt`` + ``completion`` + ``label``, or ``messages`` + ``label`` where
the last assistant turn is the completion). ``label`` is true for a desirable completion. ``id`` hashes prompt,
completion and label (the dedupe key: the same answer with the opposite label is a different row); ``prompt_hash``
hashes the normalised prompt (the decontamination key); the split key is the normalised first user turn.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, StrictBool, field_validator

from schemas.preference import MESSAGES, SCHEMA_VERSION, Message, messages_id

UNPAIRED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("prompt", MESSAGES, nullable=False),
        pa.field("completion", MESSAGES, nullable=False),
        pa.field("label", pa.bool_(), nullable=False),
        pa.field("prompt_hash", pa.string(), nullable=False),
    ],
    metadata={"align.schema_version": SCHEMA_VERSION},
)


class UnpairedRow(BaseModel):
    """Row model of :data:`UNPAIRED_SCHEMA` (the pyarrow schema is what is written)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    source_row: int
    prompt: list[Message]
    completion: list[Message]
    label: StrictBool
    prompt_hash: str

    @field_validator("prompt")
    @classmethod
    def check_prompt_ends_with_user(cls, v: list[Message]) -> list[Message]:
        if not v or v[-1].role != "user":
            raise ValueError("prompt must be non-empty and end with a user turn")
        return v

    @field_validator("completion")
    @classmethod
    def check_completion_is_assistant(cls, v: list[Message]) -> list[Message]:
        if not v or any(m.role != "assistant" for m in v):
            raise ValueError("completion must be one or more assistant turns")
        return v


def label_text(label: bool) -> str:
    return "true" if label else "false"


def unpaired_id(prompt: list[dict], completion: list[dict], label: bool) -> str:
    """Content id of an unpaired row: hash of its exact prompt, completion and label."""
    return messages_id(prompt, completion, suffix=label_text(label))
