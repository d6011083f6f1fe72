"""Online RL stage ``rl``: TRL RLOOTrainer or GRPOTrainer (``rl.method``) against the pipeline's reward model.

- Start policy: ``rl.model``, else the DPO result when DPO ran in this pipeline, else SFT (flows/align.py passes it).
- Reward: ``rl.reward_model``, else the reward stage's output. The reward model's tokenizer is not the policy's (an
  encoder such as MiniLM has no chat template, ours renders plain ``Role: text`` lines), so TRL's own reward-model
  path, which renders with the tokenizer it is given, is not used: a callable (:class:`RewardModelReward`) scores
  each prompt + completion as one conversation through the reward stage's own scorer and saved tokenizer, token for
  token what its RewardTrainer saw (``RewardScorer.encode``; tests/test_rl.py checks the equality).
- Prompts: the distinct prompts of the train split (decontaminated by the data plane); a prompt of the validation
  or test split never goes in.
- ``reward_mean_start`` / ``reward_mean_final``: mean reward-model score of greedy answers (``max_completion_length``
  tokens) to held-out prompts (validation; test when the dataset has no validation split) by the start policy and by
  the trained one. Per-step reward, completion-length and KL curves come from the trainer's logs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.training.stage import StageConfigError, StageResult, method_for, rl_section, stage_dtype, train_stage

__all__ = ["RewardModelReward", "StageResult", "heldout_prompts", "rl_prompts", "rl_stage", "train_rl"]

HELDOUT_SPLITS = ("validation", "test")  # prompts that never train the policy


def heldout_split(dataset_dir: Path) -> Path:
    """The split held-out metrics read: validation, or test when the dataset has no validation split."""
    validation = Path(dataset_dir) / "validation.parquet"
    return validation if validation.is_file() else Path(dataset_dir) / "test.parquet"


def distinct_prompts(path: Path, exclude: frozenset[str] = frozenset()) -> list[tuple[str, list[dict]]]:
    """(prompt hash, prompt messages) of each distinct prompt of a split, by hash (a stable order)."""
    table = pq.read_table(path, columns=["prompt", "prompt_hash"]).to_pylist()
    seen: dict[str, list[dict]] = {}
    for row in table:
        if row["prompt_hash"] not in seen and row["prompt_hash"] not in exclude:
            seen[row["prompt_hash"]] = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    return sorted(seen.items())


def rl_prompts(dataset_dir: Path) -> list[list[dict]]:
    """The train split's distinct prompts, none of them a prompt of a held-out split."""
    dataset_dir = Path(dataset_dir)
    held = [dataset_dir / f"{s}.parquet" for s in HELDOUT_SPLITS if (dataset_dir / f"{s}.parquet").is_file()]
    exclude = frozenset(h for path in held for h, _ in distinct_prompts(path))
    return [p for _, p in distinct_prompts(dataset_dir / "train.parquet", exclude)]


def heldout_prompts(dataset_dir: Path, limit: int) -> list[list[dict]]:
    return [p for _, p in distinct_prompts(heldout_split(dataset_dir))][:limit]


class RewardModelReward:
    """TRL reward function ``f(prompts, completions, **kw) -> list[float]`` over a trained reward model.

    Each (prompt, completion) is one conversation, scored by ``RewardScorer`` with the reward model's own
    tokenizer and chat template (the ones its stage trained and saved it with).
    """

    __name__ = "reward_model"  # TRL names the per-function curve after it: rewards/reward_model/mean

    def __init__(self, scorer):
        self.scorer = scorer

    @classmethod
    def load(
        cls, model_dir: Path | str, batch_size: int = 16, dtype: str = "float32", trust_remote_code: bool = False
    ):
        from tasks.training.reward import RewardScorer

        return cls(RewardScorer.load(model_dir, batch_size, dtype, trust_remote_code=trust_remote_code))

    @staticmethod
    def conversations(prompts: Sequence[list[dict]], completions: Sequence[list[dict]]) -> list[list[dict]]:
        """Prompt turns + the completion's assistant turn(s), as the reward stage saw prompt + chosen."""
        if prompts and isinstance(prompts[0], str):
            raise TypeError("the RL stage trains on conversational prompts (message lists), got plain strings")
        return [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.scorer(self.conversations(prompts, completions))


def rl_sets(recipe, method, tokenizer, config, dataset_dir: Path, extra_train, inputs: dict) -> dict:
    """``Method.datasets`` of rloo/grpo: prompt-only train (and eval) sets and the reward callable."""
    from datasets import Dataset

    if extra_train:
        raise StageConfigError("rl: trains on the train split's prompts only; extra training files are not used")
    prompts = rl_prompts(dataset_dir)
    if not prompts:
        raise StageConfigError(
            f"rl: {Path(dataset_dir) / 'train.parquet'} holds no prompt outside the held-out splits"
        )
    remote = recipe.model.trust_remote_code
    reward = RewardModelReward.load(inputs["reward_model"], trust_remote_code=remote)
    if "trust_remote_code" not in rl_section(recipe).args:  # TRL loads the frozen reference (beta > 0) by path
        config.trust_remote_code = remote
    out = {"train": Dataset.from_dict({"prompt": prompts}), "train_rows": len(prompts)}
    if config.eval_strategy != "no":
        held = heldout_prompts(dataset_dir, len(prompts))
        out.update(eval=Dataset.from_dict({"prompt": held}), eval_rows=len(held))
    out["trainer_kwargs"] = {"reward_funcs": reward}
    return out


def completion_length(recipe) -> int:
    """``rl.args.max_completion_length``, else the TRL config's default."""
    section = rl_section(recipe)
    if "max_completion_length" in section.args:
        return int(section.args["max_completion_length"])
    module, cls = method_for(recipe, "rl").config.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(module), cls))
    return int(next(f.default for f in fields if f.name == "max_completion_length"))


def greedy_reward(model_ref: str, prompts: list[list[dict]], reward: RewardModelReward, recipe) -> dict:
    """Mean reward of one policy's greedy answers to ``prompts`` and their mean length in tokens."""
    from schemas.cai_config import GenerationSpec
    from tasks.training.generation import load_generator

    settings = GenerationSpec(max_new_tokens=completion_length(recipe), temperature=0.0, top_p=1.0, batch_size=16)
    generator = load_generator(
        model_ref,
        settings,
        chat_template=recipe.model.chat_template,
        progress=False,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    outputs = generator(prompts)
    scores = reward(prompts, [[{"role": "assistant", "content": o.text}] for o in outputs])
    return {"mean": sum(scores) / len(scores), "tokens": sum(o.num_tokens for o in outputs) / len(outputs)}


def reward_gain(recipe, reward_model: str):
    """``evaluate`` of train_stage: the held-out reward of the start policy and of the trained one."""

    def heldout(model_dir: Path, base: str, dataset_dir: Path) -> dict:
        prompts = heldout_prompts(dataset_dir, rl_section(recipe).heldout_prompts)
        remote = recipe.model.trust_remote_code
        reward = RewardModelReward.load(reward_model, dtype=stage_dtype(recipe), trust_remote_code=remote)
        start, final = (greedy_reward(str(m), prompts, reward, recipe) for m in (base, model_dir))
        return {
            "reward_mean_start": start["mean"],
            "reward_mean_final": final["mean"],
            "reward_gain": final["mean"] - start["mean"],
            "answer_tokens_start": start["tokens"],
            "answer_tokens_final": final["tokens"],
            "heldout_prompts": len(prompts),
        }

    return heldout


def reward_model_for(recipe, reward_model: Path | str | None) -> str:
    """``rl.reward_model`` from the recipe, else the pipeline's reward stage output."""
    from tasks.training.models import resolve_model_ref

    section = rl_section(recipe)
    if section.reward_model:
        return resolve_model_ref(section.reward_model, "rl.reward_model")
    if reward_model is None:
        raise StageConfigError(
            "rl: no reward model; set rl.reward_model in the recipe or run the reward stage before rl"
        )
    return resolve_model_ref(str(reward_model), "rl reward model")


def train_rl(
    recipe,
    dataset_dir: Path,
    base_model: Path | None = None,
    output_root: Path | None = None,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
    reward_model: Path | None = None,
) -> StageResult:
    """Pure entry (no Prefect): RLOO / GRPO from ``base_model`` (DPO or SFT) against ``reward_model``."""
    reward = reward_model_for(recipe, reward_model)
    return train_stage(
        "rl",
        recipe,
        dataset_dir,
        base_model,
        output_root,
        extra_train,
        callbacks,
        evaluate=reward_gain(recipe, reward),
        inputs={"reward_model": reward},
    )


# Reuse is keyed by content hashes in train_stage (result.json), so Prefect's own input cache is off.
rl_stage = task(train_rl, name="rl", cache_policy=NO_CACHE)
