"""Preference-optimisation stage: TRL DPOTrainer (reference = the SFT/base model, or the adapter-disabled
base under LoRA), or ORPO / SimPO (trl.experimental) selected by ``dpo.method``. The frozen reference's
log-probs are precomputed once before step 1 (TRL ``precompute_ref_log_probs``; no second model is then loaded
under full fine-tuning) when the run covers an epoch of the train set, unless ``dpo.args`` says otherwise (the
rule and its measured cost: tasks/training/stage.py ``precompute_ref_default``).

Held-out metrics (on the validation split; test is the evaluate stage's) are computed the same way for every
method, against the stage's base model as reference,
in the stage's dtype on the training device: implicit reward r = beta * (log pi(y|x) - log ref(y|x)) from the
one log-prob helper (tasks/training/logprobs.py); accuracy is the one ``preference_accuracy`` (a tie counts
half, so the untrained policy, pi == ref, scores exactly 0.5 at step 0: not computed). Held-out pairs longer than
the stage's ``max_length`` are left out and counted, as training drops them. KL is not reported here: its one
definition (per token, on the policy's own samples) is the evaluate stage's ``kl_per_token``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.evaluation.metrics import preference_accuracy
from tasks.training.logprobs import answer_stats, inference_device, split_prompt_answer
from tasks.training.stage import StageResult, read_rows, stage_dtype, stage_max_length, train_stage

__all__ = ["StageResult", "dpo_beta", "dpo_stage", "train_dpo", "implicit_rewards", "dpo_preference_metrics"]


def dpo_beta(recipe) -> float:
    """beta of the held-out implicit reward: ``dpo.eval_beta``, else the trainer's ``args.beta``, else 0.1."""
    return recipe.dpo.eval_beta or recipe.dpo.args.get("beta", 0.1)


def implicit_rewards(policy, ref, tokenizer, rows: list[dict], side: str, beta: float, source: str = "rows"):
    """beta * (log pi(answer|prompt) - log ref(answer|prompt)) of each row's ``side`` (chosen or rejected);
    ``source`` names the rows in a template error (e.g. the parquet file)."""
    pairs = [
        split_prompt_answer(tokenizer, r["prompt"], r[side], f"{source} row {i} (id {r.get('id')}, {side})")
        for i, r in enumerate(rows)
    ]
    stats = answer_stats(policy, pairs, tokenizer.pad_token_id, ref=ref)
    return [beta * (s.logp - s.ref_logp) for s in stats]


def dpo_preference_metrics(policy, ref, tokenizer, rows: list[dict], beta: float, source: str = "rows") -> dict:
    """Implicit-reward accuracy, mean rewards and margin of ``policy`` against ``ref`` on preference rows."""
    rc = implicit_rewards(policy, ref, tokenizer, rows, "chosen", beta, source)
    rr = implicit_rewards(policy, ref, tokenizer, rows, "rejected", beta, source)
    n = max(len(rows), 1)
    return {
        "reward_accuracy": preference_accuracy(rc, rr),
        "chosen_reward": sum(rc) / n,
        "rejected_reward": sum(rr) / n,
        "reward_margin": sum(a - b for a, b in zip(rc, rr)) / n,
    }


def rows_within(tokenizer, rows: list[dict], max_length: int | None, source: str = "rows") -> tuple[list[dict], int]:
    """The pairs whose chosen and rejected conversations both fit ``max_length`` tokens (training drops the others
    the same way: never truncated), and how many did not. Long held-out pairs were most of a real model's
    held-out cost on CPU (SmolLM2, hh-rlhf rows up to ~600 tokens) and measure what training never saw."""
    if not max_length:
        return rows, 0

    def fits(i: int, r: dict) -> bool:
        return all(
            sum(map(len, split_prompt_answer(tokenizer, r["prompt"], r[side], f"{source} row {i}"))) <= max_length
            for side in ("chosen", "rejected")
        )

    kept = [r for i, r in enumerate(rows) if fits(i, r)]
    return kept, len(rows) - len(kept)


def dpo_heldout_metrics(recipe):
    def dpo_heldout(model_dir: Path, base: str, dataset_dir: Path) -> dict:
        from tasks.training.models import load_causal_lm, load_tokenizer

        dtype, device = stage_dtype(recipe), inference_device()
        remote = recipe.model.trust_remote_code
        tokenizer = load_tokenizer(model_dir, trust_remote_code=remote)
        policy = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=remote).to(device).eval()
        ref = load_causal_lm(base, dtype=dtype, tokenizer=tokenizer, trust_remote_code=remote).to(device).eval()
        beta = dpo_beta(recipe)
        split = Path(dataset_dir) / "validation.parquet"
        rows, too_long = rows_within(tokenizer, read_rows([split]), stage_max_length(recipe, "dpo"), str(split))
        # No step-0 pass: the policy starts as the reference, so every step-0 implicit reward is 0 (accuracy 0.5).
        end = dpo_preference_metrics(policy, ref, tokenizer, rows, beta, str(split))
        return {
            "final_reward_accuracy": end["reward_accuracy"],
            "final_reward_margin": end["reward_margin"],
            "final_chosen_reward": end["chosen_reward"],
            "final_rejected_reward": end["rejected_reward"],
            "heldout_pairs": len(rows),
            "heldout_pairs_too_long": too_long,
        }

    return dpo_heldout


def train_dpo(
    recipe,
    dataset_dir: Path,
    base_model: Path | None = None,
    output_root: Path | None = None,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
) -> StageResult:
    return train_stage(
        "dpo",
        recipe,
        dataset_dir,
        base_model,
        output_root,
        extra_train,
        callbacks,
        evaluate=dpo_heldout_metrics(recipe),
    )


dpo_stage = task(train_dpo, name="dpo", cache_policy=NO_CACHE)
