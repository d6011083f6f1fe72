"""SFT stage: TRL SFTTrainer on ``messages = prompt + chosen`` (plus SFT-only sources and extra pairs).

Assistant-only loss, packing, LoRA/QLoRA/full are all TRL/PEFT options set in the recipe (``sft.args``,
``sft.lora``); the setup itself lives in tasks/training.py, shared with every method.
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
