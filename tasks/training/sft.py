"""SFT stage: TRL SFTTrainer on prompt/completion rows (prompt = every turn before the answer, completion = that
answer) from the dataset's sft table (``data/<version>/sft/<split>.parquet``: ``format: sft`` sources, cleaned,
decontaminated and split with the pairs) and, with ``sft.from_pairs`` (default), prompt + chosen of every pair;
extra pairs (``extra_train``, e.g. CAI's) are added as pairs (tasks/training/examples.py).

The loss covers the answer and the template's end-of-turn tokens only (TRL's ``completion_only_loss``), so
any real chat template trains; rows longer than ``max_length`` are dropped and counted. Packing, LoRA/QLoRA
and full fine-tuning are TRL/PEFT options set in the recipe (``sft.args``, ``sft.lora``); the setup lives in
tasks/training/stage.py, shared with every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.training.examples import examples_for, fit_to_length, to_dataset
from tasks.training.stage import StageConfigError, StageResult, read_rows, train_stage

__all__ = ["StageResult", "sft_examples", "sft_sets", "sft_stage", "train_sft"]


def read_sft_table(dataset_dir: Path, split: str) -> list[list[dict]]:
    """The conversations of ``sft/<split>.parquet`` (none when the dataset has no sft table)."""
    path = Path(dataset_dir) / "sft" / f"{split}.parquet"
    if not path.is_file():
        return []
    rows = pq.read_table(path, columns=["messages"]).to_pylist()
    return [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in rows]


def sft_examples(recipe, dataset_dir: Path, split: str, extra_train: Sequence[Path] = ()) -> list[dict]:
    """The SFT rows of one split: prompt + chosen of the pairs (``sft.from_pairs``) and of ``extra_train``, then
    the sft table's conversations."""
    dataset_dir = Path(dataset_dir)
    pairs = read_rows(([dataset_dir / f"{split}.parquet"] if recipe.sft.from_pairs else []) + list(extra_train))
    return examples_for("messages", pairs, read_sft_table(dataset_dir, split))


def sft_sets(recipe, method, tokenizer, config, dataset_dir: Path, extra_train, inputs: dict) -> dict:
    """``Method.datasets`` of sft: the train (and validation) sets, rows longer than ``max_length`` dropped."""
    max_length = config.max_length
    kept, dropped = fit_to_length(tokenizer, sft_examples(recipe, dataset_dir, "train", extra_train), max_length)
    if not kept:
        what = f"all {dropped} training rows are longer than max_length {max_length} tokens" if dropped else "no rows"
        raise StageConfigError(
            f"sft: {what}; the sft table is empty and sft.from_pairs is off, or raise sft.args.max_length"
        )
    out = {"train": to_dataset(kept), "train_rows": len(kept), "train_rows_too_long": dropped}
    if config.eval_strategy != "no":
        kept, eval_dropped = fit_to_length(tokenizer, sft_examples(recipe, dataset_dir, "validation"), max_length)
        if not kept:
            raise StageConfigError(f"sft: no validation row fits max_length {max_length} tokens")
        out.update(eval=to_dataset(kept), eval_rows=len(kept), eval_rows_too_long=eval_dropped)
    if dropped := out["train_rows_too_long"] + out.get("eval_rows_too_long", 0):
        print(f"sft: {dropped} row(s) longer than max_length {max_length} dropped (not truncated)")
    return out


def train_sft(
    recipe,
    dataset_dir: Path,
    base_model: Path | None = None,
    output_root: Path | None = None,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
) -> StageResult:
    """Pure entry (no Prefect): metrics include train_loss_first/last/min and eval_loss_min."""
    return train_stage("sft", recipe, dataset_dir, base_model, output_root, extra_train, callbacks)


# Reuse is keyed by content hashes in train_stage (result.json), so Prefect's own input cache is off.
sft_stage = task(train_sft, name="sft", cache_policy=NO_CACHE)
