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

from schemas.preference import Reason
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
