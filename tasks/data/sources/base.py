"""What every adapter shares: the row error, the adapter record, and structural checks on messages.

Adapters only check *structure* (keys, types, roles, turn order). Text is kept byte-exact: no strip,
no unicode normalisation, no length or emptiness rules; those belong to tasks/clean.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.preference import ROLES, Reason

_ROLES = frozenset(ROLES)
# Names in the data's own terms (JSON), so a detail reads "expected string, found array".
_JSON_TYPES = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


class RowError(ValueError):
    """One row that cannot become a canonical row; ``read_source`` turns it into a quarantine row."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Parse = Callable[[dict, Any, "random.Random | None"], dict]


@dataclass(frozen=True)
class Adapter:
    """A source format: ``parse(record, options, rng) -> dict`` of the columns of its canonical ``table``
    (``schemas/tables.py``): preference ``{prompt, chosen, rejected, score_chosen, score_rejected}``, sft
    ``{messages}``, unpaired ``{prompt, completion, label}``.

    ``parse`` is pure and raises :class:`RowError` for a row it cannot map. ``options`` is the format's
    typed options model (``SourceConfig.typed_options()``). ``rng`` is a ``random.Random`` seeded per row
    (from the seed and the row index, so results do not depend on order or chunking) for adapters with
    ``needs_rng``; the others get ``None`` (seeding a generator per row costs more than parsing an hh row).
    """

    name: str
    parse: Parse
    needs_rng: bool = False
    table: str = "preference"  # the canonical table its rows belong to
    # Optional: the format's common shape parsed on whole columns of JSON Lines text (``fields``: the columns
    # it reads). ``parse_columns(*columns) -> (taken mask, canonical columns of the taken rows)``; the rows it
    # does not take go through ``parse``. Only for adapters without options or rng (hh-rlhf).
    parse_columns: Callable | None = None
    fields: tuple[str, ...] = ()

    def __call__(self, record: dict, options: Any = None, rng: random.Random | None = None) -> dict:
        return self.parse(record, options, rng)


def type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def wrong_type(field: str, expected: str, value: Any) -> RowError:
    return RowError(Reason.WRONG_TYPE, f"{field}: expected {expected}, found {type_name(value)}")


def require(obj: dict, key: str, kind: type, field: str | None = None) -> Any:
    """``obj[key]``, which must exist and be of ``kind`` (bool never counts as a number)."""
    field = field or key
    if key not in obj:
        raise RowError(Reason.MISSING_FIELD, f"missing field {field!r} (found keys: {sorted(obj)})")
    value = obj[key]
    if type(value) is not kind and not (isinstance(value, kind) and not isinstance(value, bool)):
        raise wrong_type(field, _JSON_TYPES.get(kind, kind.__name__), value)
    return value


def require_str(obj: dict, key: str, field: str | None = None) -> str:
    value = obj.get(key)
    if type(value) is str:  # the hot path: one dict lookup and one type check
        return value
    return require(obj, key, str, field)


def optional_str(obj: dict, key: str, field: str | None = None) -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    raise wrong_type(field or key, "string or null", value)


def score(obj: dict, key: str, field: str | None = None) -> float | None:
    """A source score: a finite number or ``None`` (missing, null and NaN all mean "no score")."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong_type(field or key, "number or null", value)
    value = float(value)
    return None if math.isnan(value) else value


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def messages(value: Any, field: str) -> list[dict]:
    """A list of ``{role, content}`` messages, validated and copied (extra keys dropped)."""
    if not isinstance(value, list):
        raise wrong_type(field, "array of messages", value)
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise wrong_type(where, "object with role and content", m)
        role = require(m, "role", str, f"{where}.role")
        if role not in _ROLES:
            raise RowError(Reason.BAD_ROLE, f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": require(m, "content", str, f"{where}.content")})
    return out


def turns(record: dict, key: str, as_role: Callable[[str], dict]) -> list[dict] | None:
    """``record[key]`` as messages: a string is one turn of ``as_role``, a list is validated messages; ``None``
    when the key is absent."""
    if key not in record:
        return None
    value = record[key]
    if isinstance(value, str):
        return [as_role(value)]
    if isinstance(value, list):
        return messages(value, key)
    raise RowError(Reason.WRONG_TYPE, f"{key}: expected string or array of messages, found {type_name(value)}")


def split_common_prefix(
    chosen: list[dict], rejected: list[dict], single_answer: bool = False
) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: the longest common prefix of the two message lists, made strict.

    Quarantines what ``trl.data_utils.extract_prompt`` gets wrong or lets through: one side a prefix of
    the other (or equal sides) is PREFIX_SIDES (TRL leaks the last shared message into the answers);
    a user turn after the point where the sides part is DIVERGENT_PROMPT (they answer different
    conversations); ``single_answer`` also requires exactly one answer turn per side (hh-rlhf).
    """
    n = min(len(chosen), len(rejected))
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    if k == n:
        if len(chosen) == len(rejected):
            raise RowError(Reason.PREFIX_SIDES, f"chosen and rejected are the same {n} messages")
        short, long_ = ("chosen", "rejected") if len(chosen) < len(rejected) else ("rejected", "chosen")
        raise RowError(
            Reason.PREFIX_SIDES,
            f"{short} ({n} messages) is a prefix of {long_} "
            f"({max(len(chosen), len(rejected))} messages): no answer to compare",
        )
    answer_c, answer_r = chosen[k:], rejected[k:]
    multi = single_answer and (len(answer_c) != 1 or len(answer_r) != 1)
    if multi or any(m["role"] != "assistant" for m in answer_c) or any(m["role"] != "assistant" for m in answer_r):
        raise RowError(
            Reason.DIVERGENT_PROMPT,
            f"sides part at message {k} ({chosen[k]['role']} vs "
            f"{rejected[k]['role']}) and continue with {_roles(answer_c)} vs {_roles(answer_r)}; "
            f"expected {'one' if single_answer else 'only'} assistant turn(s) after the common prompt",
        )
    prompt = chosen[:k]
    check_prompt(prompt)
    return prompt, answer_c, answer_r


def _roles(msgs: list[dict]) -> str:
    return "[" + ", ".join(m["role"] for m in msgs) + "]"


def check_prompt(prompt: list[dict], field: str = "prompt") -> None:
    if not prompt:
        raise RowError(Reason.BAD_TURN_ORDER, f"{field}: no turns before the answers")
    if prompt[-1]["role"] != "user":
        raise RowError(
            Reason.BAD_TURN_ORDER,
            f"{field}: must end with a user turn, ends with {prompt[-1]['role']} (turns {_roles(prompt)})",
        )


def check_answer(answer: list[dict], field: str) -> None:
    if not answer:
        raise RowError(Reason.BAD_TURN_ORDER, f"{field}: no assistant turn")
    for i, m in enumerate(answer):
        if m["role"] != "assistant":
            raise RowError(Reason.BAD_TURN_ORDER, f"{field}[{i}]: expected an assistant turn, found {m['role']}")


def pair(
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    score_chosen: float | None = None,
    score_rejected: float | None = None,
) -> dict:
    """The adapter result, after the canonical turn-order checks."""
    check_prompt(prompt)
    check_answer(chosen, "chosen")
    check_answer(rejected, "rejected")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def typed(options: Any, model: type) -> Any:
    """Adapters accept the typed options model, a plain dict, or ``None`` (defaults)."""
    return options if isinstance(options, model) else model.model_validate(options or {})
