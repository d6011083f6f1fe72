"""Preference-optimisation stage: TRL DPOTrainer (reference = the SFT/base model, or the adapter-disabled
base under LoRA), or ORPO / SimPO (trl.experimental) selected by ``dpo.method``.

Held-out metrics are computed the same way for every method, against the stage's base model as reference:
implicit reward r = beta * (log pi(y|x) - log ref(y|x)); accuracy counts a tie as half, so the untrained
policy (pi == ref) scores exactly 0.5 at step 0. KL is estimated teacher-forced on the held-out prompts and
their chosen answers: the sum over answer tokens of KL(pi(.|context) || ref(.|context)), averaged per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.training.stage import StageResult, read_rows, train_stage

__all__ = ["StageResult", "dpo_stage", "train_dpo", "sequence_stats", "dpo_preference_metrics"]


def _encode(tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[list[int], int]:
    def ids(messages, gen):
        return tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=True,
            return_dict=True,
            add_generation_prompt=gen,
        )["input_ids"]

    prompt_ids, full = ids(prompt, True), ids(list(prompt) + list(answer), False)
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    return full, start


def sequence_stats(policy, ref, tokenizer, pairs: list[tuple[list[dict], list[dict]]], batch_size: int = 16):
    """Per (prompt, answer): (log pi(answer|prompt), log ref(answer|prompt), sum of token KL(pi||ref))."""
    import torch

    out = []
    pad = tokenizer.pad_token_id or 0
    for i in range(0, len(pairs), batch_size):
        enc = [_encode(tokenizer, p, a) for p, a in pairs[i : i + batch_size]]
        width = max(len(ids) for ids, _ in enc)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in enc])
        attn = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in enc])
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for j, (ids, start) in enumerate(enc):
            mask[j, start : len(ids)] = True
        with torch.no_grad():
            lp = torch.log_softmax(policy(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float(), -1)
            lr = torch.log_softmax(ref(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float(), -1)
        target, m = input_ids[:, 1:], mask[:, 1:].float()
        logp = (lp.gather(-1, target[..., None])[..., 0] * m).sum(-1)
        logr = (lr.gather(-1, target[..., None])[..., 0] * m).sum(-1)
        kl = ((lp.exp() * (lp - lr)).sum(-1) * m).sum(-1)
        out.extend(zip(logp.tolist(), logr.tolist(), kl.tolist()))
    return out


def dpo_preference_metrics(policy, ref, tokenizer, rows: list[dict], beta: float) -> dict:
    chosen = sequence_stats(policy, ref, tokenizer, [(r["prompt"], r["chosen"]) for r in rows])
    rejected = sequence_stats(policy, ref, tokenizer, [(r["prompt"], r["rejected"]) for r in rows])
    rc = [beta * (p - q) for p, q, _ in chosen]
    rr = [beta * (p - q) for p, q, _ in rejected]
    n = max(len(rows), 1)
    return {
        "reward_accuracy": sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rc, rr)) / n,
        "chosen_reward": sum(rc) / n,
        "rejected_reward": sum(rr) / n,
        "reward_margin": sum(a - b for a, b in zip(rc, rr)) / n,
        "kl_to_ref": sum(k for _, _, k in chosen) / n,
    }


def make_heldout_metrics(recipe):
    def heldout(model_dir: Path, base: str, dataset_dir: Path) -> dict:
        from tasks.training.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        policy = load_causal_lm(model_dir).eval()
        ref = load_causal_lm(base, tokenizer=tokenizer).eval()
        beta = recipe.dpo.eval_beta or recipe.dpo.args.get("beta", 0.1)
        rows = read_rows([Path(dataset_dir) / "test.parquet"])
        start = dpo_preference_metrics(ref, ref, tokenizer, rows, beta)
        end = dpo_preference_metrics(policy, ref, tokenizer, rows, beta)
        return {
            "step0_reward_accuracy": start["reward_accuracy"],
            "final_reward_accuracy": end["reward_accuracy"],
            "final_reward_margin": end["reward_margin"],
            "final_chosen_reward": end["chosen_reward"],
            "final_rejected_reward": end["rejected_reward"],
            "kl_to_ref": end["kl_to_ref"],
            "heldout_pairs": len(rows),
        }

    return heldout


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
        evaluate=make_heldout_metrics(recipe),
    )


dpo_stage = task(train_dpo, name="dpo", cache_policy=NO_CACHE)
