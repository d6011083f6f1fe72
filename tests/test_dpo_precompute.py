"""DPO (and KTO) precompute the frozen reference's log-probs by the rule of ``precompute_ref_default``; an explicit
``dpo.args.precompute_ref_log_probs`` wins; a tiny DPO run with it on trains and reports its implicit rewards."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback

from schemas.recipe import Recipe, deep_merge, load_recipe
from tasks.training.stage import METHODS, make_trl_config, precompute_ref_default, reference_forwards

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
SHORT = {"max_steps": 5, "per_device_train_batch_size": 16}  # 80 pairs: a quarter of 303


def rule(tmp_path, args: dict, lora=None, method: str = "dpo", train_rows: int = 303, eval_rows: int = 0):
    m = METHODS[method]
    config = make_trl_config(m, args, tmp_path / "checkpoints")
    return precompute_ref_default(m, SimpleNamespace(args=args, lora=lora), config, train_rows, eval_rows)


def test_a_run_covering_an_epoch_precomputes_a_shorter_one_does_not(tmp_path):
    for lora in (None, LORA):  # full fine-tuning or LoRA: the same rule (the reference scores fewer rows)
        assert rule(tmp_path, SHORT, lora) is False  # 303 rows precomputed vs 80 scored per batch
        assert rule(tmp_path, {**SHORT, "max_steps": 19}, lora) is True  # 304 rows seen
        assert rule(tmp_path, {"num_train_epochs": 1}, lora) is True
    assert rule(tmp_path, {"num_train_epochs": 1}, method="kto") is True  # KTO's reference is frozen too
    assert rule(tmp_path, SHORT, method="kto") is False
    # five evaluations of 100 rows: per batch 80 + 500 rows vs 303 + 100 precomputed
    every_step = {**SHORT, "eval_strategy": "steps", "eval_steps": 1}
    assert rule(tmp_path, every_step, LORA, eval_rows=100) is True
    assert rule(tmp_path, {**every_step, "eval_steps": 5}, LORA, eval_rows=100) is False


def test_reference_forwards_counts_rows_and_evaluations(tmp_path):
    config = make_trl_config(
        METHODS["dpo"],
        {**SHORT, "max_steps": 10, "gradient_accumulation_steps": 2, "eval_strategy": "steps", "eval_steps": 0.5},
        tmp_path,
    )
    assert reference_forwards(config, 303, 30) == (333, 10 * 32 + 2 * 30)
    assert reference_forwards(config, 303, 30, world=2) == (333, 10 * 64 + 2 * 30)


def test_explicit_recipe_value_wins_and_moving_or_absent_references_are_left_alone(tmp_path):
    epoch = {"num_train_epochs": 1}
    assert rule(tmp_path, {**epoch, "precompute_ref_log_probs": False}) is False
    assert rule(tmp_path, {**SHORT, "precompute_ref_log_probs": True}, LORA) is True
    assert rule(tmp_path, {**epoch, "sync_ref_model": True}) is False  # the reference moves
    for method in ("orpo", "simpo"):  # no reference, no such field: nothing is set
        assert rule(tmp_path, SHORT, method=method) is None


class _Seen(TrainerCallback):
    def __init__(self):
        self.logged: dict[str, float] = {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.precompute = args.precompute_ref_log_probs
        self.columns = train_dataloader.dataset.column_names

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.update(logs or {})


@pytest.mark.slow
def test_tiny_dpo_two_steps_with_precomputed_reference_trains(tiny_dataset, tmp_path):
    from tasks.training.dpo import train_dpo
    from tasks.training.stage import resolve_base, training_stage_key

    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml")
    # 2 steps x 160 pairs + one evaluation: more rows than the 303 train + 39 eval pairs, so the default is on
    over = {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "per_device_train_batch_size": 160}
    recipe = Recipe.model_validate(deep_merge(tiny.model_dump(mode="json"), {"dpo": {"args": over}}))
    assert "precompute_ref_log_probs" not in recipe.dpo.args
    base = resolve_base(recipe, "sft", tiny_dataset, None, tmp_path / "base")  # the tiny base as the "SFT" model
    seen = _Seen()
    result = train_dpo(recipe, tiny_dataset, Path(base), tmp_path / "runs", callbacks=[seen])

    assert seen.precompute is True and {"ref_chosen_logps", "ref_rejected_logps"} <= set(seen.columns)
    rewards = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    assert all(math.isfinite(seen.logged[k]) and math.isfinite(seen.logged[f"eval_{k}"]) for k in rewards)
    m = result.metrics
    assert m["global_step"] == 2 and math.isfinite(m["train_loss_first"]) and math.isfinite(m["train_loss_last"])
    assert all(math.isfinite(m[k]) for k in ("final_reward_accuracy", "final_reward_margin", "eval_loss_last"))
    stage = next((tmp_path / "runs").glob("tiny/*/dpo-*"))
    assert stage.name.endswith(training_stage_key(recipe, METHODS["dpo"], tiny_dataset, base, []))
    off = Recipe.model_validate(
        deep_merge(recipe.model_dump(mode="json"), {"dpo": {"args": {"precompute_ref_log_probs": False}}})
    )
    assert training_stage_key(off, METHODS["dpo"], tiny_dataset, base, []) not in stage.name  # not reused
