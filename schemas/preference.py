"""The canonical conversational preference row: the one definition every stage reads and writes.

It is TRL's conversational preference format (``prompt``/``chosen``/``rejected`` as message lists),
plus provenance (``source``, ``source_row``), the source's scores, and two content hashes:
``id`` (the dedupe key) and ``prompt_hash`` (the split and decontamination key).
"""

from __future__ import annotations

import hashlib
import unicodedata
from enum import StrEnum
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, field_validator

# 2: the quarantine table names the canonical table a row was kept out of (`table`); sft/ and unpaired/ tables
SCHEMA_VERSION = "2"

ROLES = ("system", "user", "assistant")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("prompt", MESSAGES, nullable=False),
        pa.field("chosen", MESSAGES, nullable=False),
        pa.field("rejected", MESSAGES, nullable=False),
        pa.field("score_chosen", pa.float64(), nullable=True),
        pa.field("score_rejected", pa.float64(), nullable=True),
        pa.field("prompt_hash", pa.string(), nullable=False),
    ],
    metadata={"align.schema_version": SCHEMA_VERSION},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("table", pa.string(), nullable=False),  # preference | sft | unpaired (schemas/tables.py)
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
    ],
    metadata={"align.schema_version": SCHEMA_VERSION},
)


class Reason(StrEnum):
    """Quarantine reason codes. One code per rule; ``detail`` says what exactly was found."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    MISSING_MARKER = "missing_marker"  # hh-rlhf transcript without a Human:/Assistant: structure
    PREFIX_SIDES = "prefix_sides"  # one side is a prefix of the other: no answer to compare
    DIVERGENT_PROMPT = "divergent_prompt"  # sides differ before their final assistant turn
    BAD_ROLE = "bad_role"
    BAD_TURN_ORDER = "bad_turn_order"  # prompt does not end with a user turn, or answer not assistant
    EMPTY_TURN = "empty_turn"
    IDENTICAL_SIDES = "identical_sides"
    TIE = "tie"
    TOO_FEW_COMPLETIONS = "too_few_completions"
    TOO_LONG = "too_long"
    TOO_SHORT = "too_short"
    DUPLICATE = "duplicate"
    CONTAMINATED = "contaminated"  # prompt is in the evaluation/decontamination list
    DOWNSAMPLED = "downsampled"  # not drawn by the source's mixture weight
    CONTRACT = "contract"  # failed a row-level data-contract expectation
    TRUNCATED = "truncated"  # a generated turn hit max_new_tokens without eos or a stop string (CAI)
    UNREVISED = "unrevised"  # the CAI revision is the initial response again
    ECHOED_INSTRUCTIONS = "echoed_instructions"  # the CAI revision repeats the critique/revision request


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class PreferenceRow(BaseModel):
    """Row model of :data:`PREFERENCE_SCHEMA` (the pyarrow schema is what is written)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    source_row: int
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    score_chosen: float | None = None
    score_rejected: float | None = None
    prompt_hash: str

    @field_validator("prompt")
    @classmethod
    def check_prompt_ends_with_user(cls, v: list[Message]) -> list[Message]:
        if not v or v[-1].role != "user":
            raise ValueError("prompt must be non-empty and end with a user turn")
        return v

    @field_validator("chosen", "rejected")
    @classmethod
    def check_answer_is_assistant(cls, v: list[Message]) -> list[Message]:
        if not v or any(m.role != "assistant" for m in v):
            raise ValueError("chosen/rejected must be one or more assistant turns")
        return v


def _digest(payload: str) -> str:
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


def _serialise(messages: list[dict]) -> str:
    # Length-prefixed, so no content can imitate a boundary; ~3x cheaper than json.dumps on the ingest
    # hot path (two hashes per row). Roles never contain NUL (adapters only emit system/user/assistant).
    return "".join(f"{m['role']}\0{len(m['content'])}\0{m['content']}" for m in messages)


def messages_id(*lists: list[dict], suffix: str = "") -> str:
    """Hash of message lists in order (each prefixed by its length), then ``suffix``: the content id of a
    canonical row of any table (``suffix`` carries a non-message field, e.g. an unpaired row's label)."""
    return _digest("".join(f"{len(m)}\0{_serialise(m)}" for m in lists) + suffix)


def content_id(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> str:
    """Deterministic id of a preference row: hash of its exact (prompt, chosen, rejected)."""
    return messages_id(prompt, chosen, rejected)


def normalise_prompt_text(text: str) -> str:
    """The form two prompts are compared in for splitting and decontamination.

    NFKC, case-folded, whitespace runs collapsed: "What is  AI?" and "what is ai?" are one prompt,
    so neither can sit in train while the other is in test.
    """
    if text.isascii():  # NFKC is the identity on ASCII and casefold() equals lower(): skip both
        return " ".join(text.lower().split())
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_hash(prompt: list[dict]) -> str:
    """Hash of the normalised prompt turns: the split and decontamination key."""
    return _digest(_serialise([{"role": m["role"], "content": normalise_prompt_text(m["content"])} for m in prompt]))


# ---- the same two hashes, column-wise (the ingest hot path) ----
# Each builds exactly the strings the per-row functions above hash, with pyarrow.compute, and only the
# blake2b calls stay in Python: ~5 µs per hh-rlhf row instead of ~25. Tests compare both on real rows.


def content_ids(prompt: pa.ListArray, chosen: pa.ListArray, rejected: pa.ListArray) -> list[str]:
    """:func:`content_id` of every row of three ``MESSAGES`` arrays (no nulls; text must be valid UTF-8)."""
    return messages_ids(prompt, chosen, rejected)


def messages_ids(*lists: pa.ListArray, suffix: pa.Array | None = None) -> list[str]:
    """:func:`messages_id` of every row of ``MESSAGES`` arrays (no nulls; valid UTF-8), ``suffix`` a string array."""
    sides = [
        pc.binary_join_element_wise(pc.cast(pc.list_value_length(a), pa.string()), _serialised(a), "\0") for a in lists
    ]
    return _digests(pc.binary_join_element_wise(*sides, *([suffix] if suffix is not None else []), ""))


def prompt_hashes(prompt: pa.ListArray) -> list[str]:
    """:func:`prompt_hash` of every row of a ``MESSAGES`` array (no nulls; text must be valid UTF-8)."""
    return _digests(_serialised(prompt, normalise_prompt_texts(_values(prompt).field("content"))))


# What str.split() splits on (str.isspace: 29 code points, none above U+3000; a test checks them all).
# Runs of two or more, and single ones other than a space, become one space (replacing every single
# space as well is ~7x slower).
_SPACES = [f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace()]
_SPACE_RUN = "[%s]{2,}|[%s]" % ("".join(_SPACES), "".join(c for c in _SPACES if c != "\\x{20}"))  # noqa: UP031


def normalise_prompt_texts(texts: pa.Array) -> pa.Array:
    """:func:`normalise_prompt_text` of every string, the same steps in the same order: NFKC and
    casefold() in Python for non-ASCII strings only (pyarrow 25's utf8_normalize returned its input
    unchanged on this stack; Arrow's lower-casing is not casefold), ascii_lower for the rest (what the
    Python function does there too), then :func:`collapse_whitespace` in Arrow."""
    folded = pc.ascii_lower(texts)
    other = ~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False)
    if other.any():
        slow = [unicodedata.normalize("NFKC", t).casefold() for t in texts.filter(pa.array(other)).to_pylist()]
        folded = pc.replace_with_mask(folded, pa.array(other), pa.array(slow, pa.string()))
    return collapse_whitespace(folded)


def collapse_whitespace(texts: pa.Array) -> pa.Array:
    """``" ".join(text.split())`` of every string: Arrow's utf8 whitespace is exactly str.isspace (a test
    checks every code point), so trimming and collapsing runs between words is the same split."""
    return pc.replace_substring_regex(pc.utf8_trim_whitespace(texts), _SPACE_RUN, " ")


def _values(messages: pa.ListArray) -> pa.StructArray:
    return messages.flatten()  # honours a sliced array's offset, unlike .values


def _serialised(messages: pa.ListArray, content: pa.Array | None = None) -> pa.Array:
    """:func:`_serialise` of every row; ``content`` replaces the messages' own text (same turns)."""
    values = _values(messages)
    content = values.field("content") if content is None else content
    turns = pc.binary_join_element_wise(
        values.field("role"), pc.cast(pc.utf8_length(content), pa.string()), content, "\0"
    )
    offsets = pc.subtract(messages.offsets, messages.offsets[0])
    return pc.binary_join(pa.ListArray.from_arrays(offsets, turns), "")


def _digests(payloads: pa.Array) -> list[str]:
    """:func:`_digest` of every string, hashed straight from the Arrow buffer (no str objects)."""
    offsets = np.frombuffer(payloads.buffers()[1], np.int32, len(payloads) + 1, payloads.offset * 4).tolist()
    data, blake2b = memoryview(payloads.buffers()[2] or b""), hashlib.blake2b
    return [blake2b(data[a:b], digest_size=16).hexdigest() for a, b in zip(offsets, offsets[1:])]


def render_messages(lists: pa.ChunkedArray | pa.ListArray) -> pa.Array:
    """Each message list as one string, "role\\x1fcontent" per turn joined by "\\x1e": for comparing lists
    (exactly, or after squashing whitespace) column-wise. Null roles/contents read as empty strings."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flat = pc.list_flatten(lists)
    turns = pc.binary_join_element_wise(
        pc.fill_null(pc.struct_field(flat, "role"), ""), pc.fill_null(pc.struct_field(flat, "content"), ""), "\x1f"
    )
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(lists).fill_null(0).to_numpy())])
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), turns), "\x1e")


def sft_messages(row: dict) -> list[dict]:
    """The SFT view of a preference row (TRL's ``messages``)."""
    return list(row["prompt"]) + list(row["chosen"])
