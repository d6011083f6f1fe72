"""SFT stage: TRL SFTTrainer on prompt/completion rows (prompt = every turn before the chosen answer,
completion = that answer), plus SFT-only sources and extra pairs (tasks/training/examples.py).

The loss covers the answer and the template's end-of-turn tokens only (TRL's ``completion_only_loss``), so
any real chat template trains; rows longer than ``max_length`` are dropped and counted. Packing, LoRA/QLoRA
and full fine-tuning are TRL/PEFT options set in the recipe (``sft.args``, ``sft.lora``); the setup lives in
tasks/training/stage.py, shared with every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.training.stage import StageResult, train_stage

__all__ = ["StageResult", "sft_stage", "train_sft"]


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
