"""Generic preference rows, shape detected per row (first match wins):

1. ShareGPT (LLaMA-Factory): ``conversations`` [{from, value}] (+ optional ``system`` string) and
   ``chosen``/``rejected`` as one {from, value} message (or a list of them). ``from``: human/user → user,
   gpt/assistant → assistant, system → system; anything else is BAD_ROLE.
2. OpenAI DPO fine-tuning: ``input.messages``, ``preferred_output``, ``non_preferred_output`` (message lists).
3. stack-exchange-paired: ``question``, ``response_j`` (preferred) over ``response_k``.
4. TRL: ``prompt``/``chosen``/``rejected`` as strings (→ user / assistant turns) or message lists. Answer
   lists that repeat the prompt as their prefix have it removed; with no ``prompt`` key, the prompt is
   the common prefix of the ``chosen``/``rejected`` lists (TRL's implicit prompt). Optional
   ``score_chosen``/``score_rejected``. A string ``prompt`` holding an hh-style transcript
   (``"\n\nHuman: …\n\nAssistant:"``, the shape of several public reward-model datasets) is cut into
   its turns by the hh-rlhf adapter's rules (string answers continue it: ``prompt + answer`` is one
   transcript), or quarantined with that adapter's reason; never one user turn with the markers inside.
A row of none of these shapes is MISSING_FIELD naming the keys each shape needs.
"""

from __future__ import annotations

from schemas.preference import Reason
from tasks.data.sources.base import (
    RowError,
    assistant,
    messages,
    optional_str,
    pair,
    require,
    require_str,
    score,
    split_common_prefix,
    turns,
    user,
    wrong_type,
)
from tasks.data.sources.hh_rlhf import is_transcript, parse_continuations, transcript_prompt

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAPES = (
    "conversations/chosen/rejected (ShareGPT)",
    "input/preferred_output/non_preferred_output (OpenAI)",
    "question/response_j/response_k (stack-exchange-paired)",
    "prompt/chosen/rejected (TRL)",
)


def sharegpt_message(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise wrong_type(field, "object with from and value", value)
    speaker = require(value, "from", str, f"{field}.from")
    if speaker not in SHAREGPT_ROLES:
        raise RowError(Reason.BAD_ROLE, f"{field}.from: {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[speaker], "content": require(value, "value", str, f"{field}.value")}


def sharegpt_answer(record: dict, key: str) -> list[dict]:
    value = record.get(key)
    if key not in record:
        raise RowError(Reason.MISSING_FIELD, f"missing field {key!r} (ShareGPT row; found keys: {sorted(record)})")
    if isinstance(value, list):
        return [sharegpt_message(m, f"{key}[{i}]") for i, m in enumerate(value)]
    return [sharegpt_message(value, key)]


def parse_sharegpt(record: dict) -> dict:
    conversations = require(record, "conversations", list)
    prompt = [sharegpt_message(m, f"conversations[{i}]") for i, m in enumerate(conversations)]
    system = optional_str(record, "system")
    if system:
        prompt.insert(0, {"role": "system", "content": system})
    return pair(prompt, sharegpt_answer(record, "chosen"), sharegpt_answer(record, "rejected"))


def parse_openai(record: dict) -> dict:
    inputs = require(record, "input", dict)
    prompt = messages(require(inputs, "messages", list, "input.messages"), "input.messages")
    return pair(
        prompt,
        messages(require(record, "preferred_output", list), "preferred_output"),
        messages(require(record, "non_preferred_output", list), "non_preferred_output"),
    )


def parse_stack_exchange(record: dict) -> dict:
    return pair(
        [user(require_str(record, "question"))],
        [assistant(require_str(record, "response_j"))],
        [assistant(require_str(record, "response_k"))],
    )


def parse_trl(record: dict) -> dict:
    chosen, rejected = turns(record, "chosen", assistant), turns(record, "rejected", assistant)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RowError(Reason.MISSING_FIELD, f"missing field {key!r} (found keys: {sorted(record)})")
    scores = score(record, "score_chosen"), score(record, "score_rejected")
    if isinstance(record.get("prompt"), str) and is_transcript(record["prompt"]):
        return _transcript_pair(record, chosen, rejected, scores)
    prompt = turns(record, "prompt", user)
    if prompt is None:
        if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
            raise RowError(
                Reason.MISSING_FIELD,
                "missing field 'prompt' (needed unless chosen and rejected "
                f"are message lists that share it; found keys: {sorted(record)})",
            )
        return pair(*split_common_prefix(chosen, rejected), *scores)
    n = len(prompt)
    if len(chosen) > n and len(rejected) > n and chosen[:n] == prompt and rejected[:n] == prompt:
        chosen, rejected = chosen[n:], rejected[n:]
    return pair(prompt, chosen, rejected, *scores)


def _transcript_pair(record: dict, chosen: list[dict], rejected: list[dict], scores: tuple) -> dict:
    """A string prompt in hh transcript form: string answers continue the transcript; message-list answers
    follow the prompt's turns."""
    if isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
        row = parse_continuations(record["prompt"], record["chosen"], record["rejected"])
        return pair(row["prompt"], row["chosen"], row["rejected"], *scores)
    return pair(transcript_prompt(record["prompt"]), chosen, rejected, *scores)


def parse(record: dict, options=None, rng=None) -> dict:
    if "conversations" in record:
        return parse_sharegpt(record)
    if "preferred_output" in record or "non_preferred_output" in record:
        return parse_openai(record)
    if "response_j" in record or "response_k" in record:
        return parse_stack_exchange(record)
    if "chosen" in record or "rejected" in record or "prompt" in record:
        return parse_trl(record)
    raise RowError(
        Reason.MISSING_FIELD,
        f"no known row shape; expected one of: {'; '.join(SHAPES)} (found keys: {sorted(record)})",
    )
