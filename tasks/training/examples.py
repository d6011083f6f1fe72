"""Training examples: canonical rows → the TRL dataset a method trains on, rows too long for it dropped.

SFT rows are TRL's conversational prompt/completion pairs: ``prompt`` = every turn before the final answer
(earlier assistant turns of a multi-turn prompt are context), ``completion`` = the final assistant turn.
SFTTrainer's ``completion_only_loss`` (its default for this format) then puts the loss on the answer's tokens
and the template's end-of-turn tokens only, with any chat template: no ``{% generation %}`` markers needed.

A row longer than ``max_length`` (tokens, rendered exactly as TRL renders it) is dropped and counted, never
trained with its end cut off: TRL would truncate an SFT row from the right and train on an answer without its
end-of-turn token, teaching the model not to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.training.templates import render_ids


def sft_example(messages: list[dict], where: str = "row") -> dict:
    """A message list ending with the assistant's answer → ``{"prompt": [...], "completion": [answer]}``."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        raise ValueError(
            f"{where}: an SFT conversation must end with an assistant turn after a prompt (ends with {last})"
        )
    return {"prompt": list(messages[:-1]), "completion": [messages[-1]]}


def to_dataset(examples: list[dict]):
    """A ``datasets.Dataset`` of examples (``examples_for``), as the TRL trainers take it."""
    from datasets import Dataset

    return Dataset.from_list(examples)


def examples_for(data: str, rows: list[dict], sft_messages: Sequence[list[dict]] = ()) -> list[dict]:
    """``data`` "messages": SFT prompt/completion rows (prompt + chosen of each pair, then ``sft_messages``, the
    conversations of the sft table); "preference": TRL's prompt/chosen/rejected."""
    if data == "messages":
        pairs = [{"prompt": r["prompt"], "completion": r["chosen"][-1:]} for r in rows]
        return pairs + [sft_example(m, "sft table") for m in sft_messages]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def example_length(tokenizer, example: dict) -> int:
    """Tokens of the longest sequence TRL builds from the example (prompt + completion, or + either side)."""
    answers = [example["completion"]] if "completion" in example else [example["chosen"], example["rejected"]]
    return max(len(render_ids(tokenizer, list(example["prompt"]) + list(a))) for a in answers)


def fit_to_length(tokenizer, examples: list[dict], max_length: int | None) -> tuple[list[dict], int]:
    """The examples that fit ``max_length`` tokens, and how many did not (dropped)."""
    if max_length is None:
        return examples, 0
    kept = [e for e in examples if example_length(tokenizer, e) <= max_length]
    return kept, len(examples) - len(kept)
