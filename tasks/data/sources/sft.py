"""``format: sft``: SFT conversations → canonical SFT rows (``schemas/sft.py``), shape detected per row (first match
wins):

1. TRL conversational / ultrachat_200k: ``messages`` [{role, content}] (ultrachat's extra ``prompt`` string and
   ``prompt_id`` are ignored: ``messages`` holds the conversation).
2. ShareGPT: ``conversations`` [{from, value}] (+ optional ``system`` string); ``from`` as in the generic adapter
   (human/user → user, gpt/assistant → assistant, system). A LLaMA-Factory ranking row (the conversation ends on
   the user's turn and ``chosen`` is the answer) becomes the conversation + its ``chosen`` answer.
3. TRL prompt-completion: ``prompt`` and ``completion``, each a string (→ a user / an assistant turn) or messages.
4. alpaca: ``instruction``, optional ``input`` (appended after a blank line when non-empty), ``output``
   (+ optional ``system``).

The conversation must end with the assistant's answer right after a user turn (BAD_TURN_ORDER otherwise, e.g. a
conversation ending on a user turn). Text stays byte-exact: an empty ``output`` is structurally fine here and
quarantined by cleaning as an empty turn, like every empty turn.
"""

from __future__ import annotations

from schemas.preference import Reason
from tasks.data.sources.base import RowError, assistant, check_prompt, messages, optional_str, require, turns, user
from tasks.data.sources.generic import sharegpt_answer, sharegpt_message

SHAPES = (
    "messages (TRL / ultrachat_200k)",
    "conversations (ShareGPT)",
    "prompt/completion (TRL)",
    "instruction/input/output (alpaca)",
)


def check_conversation(conversation: list[dict], field: str) -> list[dict]:
    """A conversation ending with the assistant's answer right after a user turn, else BAD_TURN_ORDER."""
    roles = "[" + ", ".join(m["role"] for m in conversation) + "]"
    if not conversation or conversation[-1]["role"] != "assistant":
        last = conversation[-1]["role"] if conversation else "nothing"
        raise RowError(
            Reason.BAD_TURN_ORDER,
            f"{field}: must end with the assistant's answer, ends with {last} (turns {roles})",
        )
    check_prompt(conversation[:-1], f"{field} before the answer")
    return conversation


def sharegpt_conversation(record: dict) -> list[dict]:
    conversations = require(record, "conversations", list)
    conversation = [sharegpt_message(m, f"conversations[{i}]") for i, m in enumerate(conversations)]
    system = optional_str(record, "system")
    if system:
        conversation.insert(0, {"role": "system", "content": system})
    if conversation and conversation[-1]["role"] == "user" and "chosen" in record:
        conversation += sharegpt_answer(record, "chosen")
    return check_conversation(conversation, "conversations")


def parse_prompt_completion(record: dict) -> list[dict]:
    prompt, completion = turns(record, "prompt", user), turns(record, "completion", assistant)
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise RowError(Reason.MISSING_FIELD, f"missing field {key!r} (found keys: {sorted(record)})")
    for i, m in enumerate(completion):
        if m["role"] != "assistant":
            raise RowError(Reason.BAD_TURN_ORDER, f"completion[{i}]: expected an assistant turn, found {m['role']}")
    check_prompt(prompt)
    return check_conversation(prompt + completion, "prompt + completion")


def parse_alpaca(record: dict) -> list[dict]:
    instruction = require(record, "instruction", str)
    extra = optional_str(record, "input")
    system = optional_str(record, "system")
    text = f"{instruction}\n\n{extra}" if extra else instruction
    head = [{"role": "system", "content": system}] if system else []
    return head + [user(text), assistant(require(record, "output", str))]


def parse(record: dict, options=None, rng=None) -> dict:
    if "messages" in record:
        conversation = check_conversation(messages(record["messages"], "messages"), "messages")
    elif "conversations" in record:
        conversation = sharegpt_conversation(record)
    elif "completion" in record or ("prompt" in record and "instruction" not in record):
        conversation = parse_prompt_completion(record)
    elif "instruction" in record or "output" in record:
        conversation = parse_alpaca(record)
    else:
        raise RowError(
            Reason.MISSING_FIELD,
            f"no SFT conversation; expected one of: {'; '.join(SHAPES)} (found keys: {sorted(record)})",
        )
    return {"messages": conversation}
