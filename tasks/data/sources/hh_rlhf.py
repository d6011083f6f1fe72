"""Anthropic hh-rlhf: two full transcripts (``chosen``, ``rejected``) → prompt + one final answer each.

A transcript is ``"\\n\\nHuman: …\\n\\nAssistant: …"``; it is cut on exactly those two markers and each
message's content is the text between markers, byte-exact. Decisions (never guess, quarantine instead):

- Text before the first marker (including a transcript that starts ``"Human: "`` without the leading
  blank line) → MISSING_MARKER; so is a transcript without any Human or any Assistant turn.
- ``"Human:"``/``"Assistant:"`` *inside* a turn without the blank line before it (upstream has
  ``"\\n\\nAssistant: Human: …"``) is not a marker: it stays part of that turn's text.
- A transcript ending in ``"\\n\\nAssistant:"`` (the trailing space lost upstream) ends with an empty
  assistant turn, as if the space were there; the cleaner then quarantines the empty turn.
- Prompt = longest common prefix of the two message lists; after it each side must have exactly one
  assistant turn (else DIVERGENT_PROMPT), and the prompt must end with a user turn (else BAD_TURN_ORDER).
  Equal sides, or one side a prefix of the other → PREFIX_SIDES (TRL's extract_prompt leaks a message).

Other adapters read transcripts through the public functions below (``is_transcript``,
``transcript_prompt``, ``parse_continuations``): the generic adapter's string ``prompt`` in the shape of
several public reward-model datasets (``"\n\nHuman: …\n\nAssistant:"`` + answers ``" …"``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.preference import MESSAGES, Reason
from tasks.data.sources.base import RowError, assistant, require_str, split_common_prefix

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant: "
_A = len(ASSISTANT)
_TRAILING = (HUMAN.rstrip(" "), ASSISTANT.rstrip(" "))


def transcript_messages(text: str, field: str) -> list[dict]:
    """Cut one transcript into user/assistant messages (raises MISSING_MARKER)."""
    if text.endswith(_TRAILING):
        text += " "
    pieces = text.split(HUMAN)
    head = pieces[0].split(ASSISTANT)
    if len(pieces) == 1:
        raise RowError(Reason.MISSING_MARKER, f"{field}: no {HUMAN!r} marker (starts {text[:40]!r})")
    if head[0]:
        raise RowError(Reason.MISSING_MARKER, f"{field}: text before the first {HUMAN!r} marker: {head[0][:40]!r}")
    out = [assistant(a) for a in head[1:]] + _cut(pieces)
    if len(out) == len(pieces) - 1:
        raise RowError(Reason.MISSING_MARKER, f"{field}: no {ASSISTANT!r} turn")
    return out


def is_transcript(text: str) -> bool:
    """Whether ``text`` holds an hh-style turn marker (at a turn boundary, or a leading ``"Human: "``)."""
    return HUMAN in text or _TRAILING[1] in text or text.startswith(HUMAN.lstrip("\n"))


def _cue_body(text: str, field: str) -> str:
    """``text`` without its final ``"\n\nAssistant:"`` cue (the answers continue it); raises without one."""
    for cue in (ASSISTANT, _TRAILING[1]):
        if text.endswith(cue):
            return text[: -len(cue)]
    raise RowError(
        Reason.BAD_TURN_ORDER,
        f"{field}: an hh-style transcript prompt must end with the {_TRAILING[1]!r} cue its answers continue "
        f"(ends {text[-40:]!r})",
    )


def transcript_prompt(text: str, field: str = "prompt") -> list[dict]:
    """The turns of a transcript prompt ``"\n\nHuman: …\n\nAssistant:"``, without the empty final cue."""
    turns = transcript_messages(_cue_body(text, field) + ASSISTANT, field)
    return turns[:-1]


def parse_continuations(prompt: str, chosen: str, rejected: str) -> dict:
    """A transcript prompt and the two answers that continue it → a canonical pair, by this adapter's rules
    (``prompt + answer`` is one hh transcript). The space after the cue's colon belongs to the marker:
    ``"…Assistant:"`` + ``" Sure."`` is the answer ``"Sure."``, as in the transcript ``"…Assistant: Sure."``."""
    body = _cue_body(prompt, "prompt")
    spaced = prompt.endswith(ASSISTANT)

    def full(answer: str) -> str:
        return body + ASSISTANT + (answer[1:] if not spaced and answer.startswith(" ") else answer)

    try:
        return parse({"chosen": full(chosen), "rejected": full(rejected)})
    except RowError as e:
        raise RowError(e.reason, f"prompt + answers read as one hh transcript: {e.detail}") from None


def _cut(pieces: list[str]) -> list[dict]:
    """Messages of the pieces after each Human marker (``pieces[0]``, before the first, is skipped)."""
    out = []
    for piece in pieces[1:]:
        turns = piece.split(ASSISTANT)
        out.append({"role": "user", "content": turns[0]})
        for a in turns[1:]:
            out.append({"role": "assistant", "content": a})
    return out


def parse(record: dict, options=None, rng=None) -> dict:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if type(chosen) is not str or type(rejected) is not str:
        chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    # Fast path, the shape of almost every row: the same text up to each side's last Assistant marker,
    # then different single answers. It cuts the shared prompt once instead of both transcripts
    # (~30% less time per row) and gives exactly the general path's result (markers cannot overlap
    # each other; tests compare the two on every real row); anything else takes the general path.
    i = chosen.rfind(ASSISTANT)
    if (
        i > 0
        and i == rejected.rfind(ASSISTANT)
        and chosen.startswith(HUMAN)
        and not chosen.endswith(_TRAILING)
        and not rejected.endswith(_TRAILING)
    ):
        prompt_text = chosen[:i]
        answer_c, answer_r = chosen[i + _A :], rejected[i + _A :]
        if (
            rejected.startswith(prompt_text)
            and answer_c != answer_r
            and HUMAN not in answer_c
            and HUMAN not in answer_r
        ):
            prompt = _cut(prompt_text.split(HUMAN))
            if prompt[-1]["role"] == "user":
                return {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": answer_c}],
                    "rejected": [{"role": "assistant", "content": answer_r}],
                    "score_chosen": None,
                    "score_rejected": None,
                }
    prompt, answer_c, answer_r = split_common_prefix(
        transcript_messages(chosen, "chosen"), transcript_messages(rejected, "rejected"), single_answer=True
    )
    return {"prompt": prompt, "chosen": answer_c, "rejected": answer_r, "score_chosen": None, "score_rejected": None}


def parse_columns(chosen: pa.Array, rejected: pa.Array) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """:func:`parse`'s fast path on whole columns (Arrow compute, no Python per row): which rows take it, and
    their canonical columns (in the order of those rows). The rows it does not take (another shape, a null, a
    row the general path must judge) go through :func:`parse` one by one; tests compare both on every real row.
    Written by hand because no library splits hh transcripts; the rules are :func:`parse`'s, marker for marker."""
    chosen_split = pc.split_pattern(chosen, ASSISTANT, max_splits=1, reverse=True)
    rejected_split = pc.split_pattern(rejected, ASSISTANT, max_splits=1, reverse=True)
    two = pc.and_(pc.equal(pc.list_value_length(chosen_split), 2), pc.equal(pc.list_value_length(rejected_split), 2))
    ok = two.fill_null(False).to_numpy(zero_copy_only=False)
    # pieces of rows without a marker: any value (they are not taken); list_element needs index 1 everywhere
    pad = pa.array([[None, None]] * len(chosen), pa.list_(pa.string()))
    chosen_split = pc.if_else(two.fill_null(False), chosen_split, pad)
    rejected_split = pc.if_else(two.fill_null(False), rejected_split, pad)
    prompt_text, answer_c = pc.list_element(chosen_split, 0), pc.list_element(chosen_split, 1)
    rejected_prompt, answer_r = pc.list_element(rejected_split, 0), pc.list_element(rejected_split, 1)
    checks = [
        pc.greater(pc.binary_length(prompt_text), 0),
        pc.equal(prompt_text, rejected_prompt),
        pc.starts_with(chosen, HUMAN),
        pc.invert(pc.ends_with(chosen, _TRAILING[0])),
        pc.invert(pc.ends_with(chosen, _TRAILING[1])),
        pc.invert(pc.ends_with(rejected, _TRAILING[0])),
        pc.invert(pc.ends_with(rejected, _TRAILING[1])),
        pc.not_equal(answer_c, answer_r),
        pc.invert(pc.match_substring(answer_c, HUMAN)),
        pc.invert(pc.match_substring(answer_r, HUMAN)),
    ]
    for check in checks:
        ok &= check.fill_null(False).to_numpy(zero_copy_only=False)
    take = pa.array(np.flatnonzero(ok), pa.int64())
    prompt_text, answer_c, answer_r = (pc.take(x, take) for x in (prompt_text, answer_c, answer_r))
    # the prompt: its Human pieces (the first, before the first marker, is empty: skipped), each cut on Assistant
    pieces = pc.split_pattern(prompt_text, HUMAN)
    piece_counts = pc.list_value_length(pieces).to_numpy() - 1
    piece_offsets = pieces.offsets.to_numpy()
    keep = np.ones(len(pieces.values), dtype=bool)
    keep[piece_offsets[:-1]] = False  # each row's first piece
    body = pieces.values.filter(pa.array(keep))
    turns = pc.split_pattern(body, ASSISTANT)
    per_piece = pc.list_value_length(turns).to_numpy()
    contents = turns.values
    first_of_piece = np.zeros(len(contents), dtype=bool)
    first_of_piece[turns.offsets.to_numpy()[:-1]] = True
    roles = pa.array(np.where(first_of_piece, "user", "assistant").tolist(), pa.string())
    # rows' turn offsets: the turns of its pieces, summed
    piece_ends = np.cumsum(piece_counts)
    turn_ends = np.cumsum(per_piece)
    row_turns = np.diff(np.concatenate([[0], turn_ends[piece_ends - 1]]) if len(piece_ends) else np.zeros(1, int))
    # the prompt must end with a user turn: its last piece has no Assistant marker
    last_is_user = per_piece[piece_ends - 1] == 1 if len(piece_ends) else np.zeros(0, dtype=bool)
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_turns)]).astype(np.int32))
    values = pa.StructArray.from_arrays([roles, contents], fields=list(MESSAGES.value_type))
    prompt = pa.ListArray.from_arrays(offsets, values, type=MESSAGES)
    taken = np.flatnonzero(ok)
    if not last_is_user.all():  # a prompt ending with an assistant turn: the general path says why
        ok[taken[~last_is_user]] = False
        prompt = prompt.filter(pa.array(last_is_user))
        answer_c, answer_r = answer_c.filter(pa.array(last_is_user)), answer_r.filter(pa.array(last_is_user))
    single = pa.array(np.arange(len(answer_c) + 1, dtype=np.int32))
    role = pa.array(["assistant"] * len(answer_c), pa.string())
    answers = {
        side: pa.ListArray.from_arrays(
            single, pa.StructArray.from_arrays([role, text], fields=list(MESSAGES.value_type)), type=MESSAGES
        )
        for side, text in (("chosen", answer_c), ("rejected", answer_r))
    }
    none = pa.nulls(len(answer_c), pa.float64())
    return ok, {"prompt": prompt, **answers, "score_chosen": none, "score_rejected": none}
