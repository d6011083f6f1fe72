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

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.recipe import PROJECT_ROOT
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
    """``data`` "messages": SFT prompt/completion rows (prompt + chosen of each pair, then ``sft_messages``);
    "preference": TRL's prompt/chosen/rejected."""
    if data == "messages":
        pairs = [{"prompt": r["prompt"], "completion": r["chosen"][-1:]} for r in rows]
        return pairs + [sft_example(m, "sft.extra_sources") for m in sft_messages]
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


def read_sft_sources(sources: list) -> list[list[dict]]:
    """SFT-only sources: .jsonl/.parquet files with a ``messages`` column, or canonical rows (prompt+chosen)."""
    out = []
    for src in sources:
        path = Path(src.path)
        if not path.is_absolute():
            path = PROJECT_ROOT / path
        table = (
            pq.read_table(path)
            if path.suffix == ".parquet"
            else pa.Table.from_pylist(
                [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            )
        )
        for i, r in enumerate(table.to_pylist()[: src.limit]):
            messages = r["messages"] if "messages" in r else r["prompt"] + r["chosen"]
            sft_example(messages, f"{path} row {i}")  # fails here, naming the file and row
            out.append(messages)
    return out
