"""The one batched per-token log-prob helper: what DPO's held-out metrics, the evaluation (implicit-reward
accuracy, KL) and the reward model's scoring batches compute over token ids.

Conventions, defined here once:
- A *pair* is ``(prompt ids, answer ids)``: the prompt as the chat template renders it with the generation
  prompt, the answer the tokens after it, end-of-turn included (what the policy emits and SFT/DPO train on).
- ``split_prompt_answer`` (over the one rendering, ``templates.render_ids``): the prompt render must be a token
  prefix of the full render; when it is not, it raises naming the row. One behaviour everywhere, the one TRL's
  ``apply_chat_template`` has: a template that rewrites earlier turns once an answer follows cannot be split
  honestly, and skipping would hide it.
- Batches are right-padded, sorted by length (less padding), and built on the model's own device; logits are
  upcast to float32 before the log-softmax, whatever dtype the model runs in.
- KL(policy || ref) at an answer position is exact over the vocabulary: sum_v p(v) (log p(v) - log q(v)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.training.templates import render_ids

if TYPE_CHECKING:  # torch is imported where tensors are made: a reused run imports this module without it
    import torch

Pair = tuple[Sequence[int], Sequence[int]]


class PromptPrefixError(ValueError):
    """The chat template does not render the prompt as a prefix of prompt + answer."""


def split_prompt_answer(tokenizer, prompt: list[dict], answer: list[dict] | str, row: str = "") -> tuple[list, list]:
    """(prompt ids with the generation prompt, answer ids incl. end of turn), split where the template renders
    the prompt. ``answer`` is the answer's message list or its text; ``row`` names the row in the error."""
    answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
    prompt_ids = list(render_ids(tokenizer, prompt, add_generation_prompt=True))
    full = list(render_ids(tokenizer, list(prompt) + answer))
    if full[: len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
        raise PromptPrefixError(
            f"{row or 'row'}: the chat template does not render the prompt (with the generation prompt) as a "
            f"prefix of prompt + answer (token {at} of {len(prompt_ids)} differs): the answer's tokens cannot be "
            f"told apart; use a template that keeps earlier turns unchanged (model.chat_template: chatml)"
        )
    return prompt_ids, full[len(prompt_ids) :]


def inference_device() -> str:
    """Where held-out metrics run when a stage loads a model for them: the GPU when there is one (as training)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` on ``device`` (pad id 0 when the tokenizer has none)."""
    import torch

    width = max(len(s) for s in sequences)
    pad = 0 if pad_id is None else pad_id
    ids = torch.full((len(sequences), width), pad, dtype=torch.long, device=device)
    attn = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long, device=device)
        attn[b, : len(s)] = 1
    return ids, attn


def answer_batch(pairs: Sequence[Pair], pad_id: int | None, device):
    """``input_ids``, ``attention_mask`` and ``answer_mask`` (bool ``[batch, width - 1]``: logits position t
    predicts token t + 1, an answer token)."""
    import torch

    for p, _ in pairs:
        if not p:
            raise ValueError("answer_batch: a pair has no prompt tokens, so its first answer token has no context")
    ids, attn = pad_right([list(p) + list(a) for p, a in pairs], pad_id, device)
    mask = torch.zeros((len(pairs), ids.shape[1] - 1), dtype=torch.bool, device=device)
    for b, (p, a) in enumerate(pairs):
        mask[b, len(p) - 1 : len(p) + len(a) - 1] = True
    return ids, attn, mask


def token_kl(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || ref) per position from log-probabilities over the vocabulary (last axis)."""
    return (policy_logprobs.exp() * (policy_logprobs - ref_logprobs)).sum(-1)


@dataclass(frozen=True)
class AnswerStats:
    """One pair: log pi(answer | prompt), log ref(answer | prompt), the summed per-token KL(pi || ref) over the
    answer, and the number of answer tokens. ``ref``/``kl`` are None when no reference was given."""

    logp: float
    ref_logp: float | None
    kl: float | None
    tokens: int


def _answer_logprobs(model, ids, attn, mask):
    """Log-softmax (float32) at the answer positions only, ``[answer tokens, vocab]``, and the tokens' ids."""
    import torch

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return torch.log_softmax(logits[mask].float(), dim=-1), ids[:, 1:][mask]


def _batch_stats(policy, ref, pairs: Sequence[Pair], pad_id: int | None) -> list[AnswerStats]:
    import torch

    ids, attn, mask = answer_batch(pairs, pad_id, model_device(policy))

    def sums(per_token: torch.Tensor) -> list[float]:  # per answer position -> per pair
        row = mask.nonzero()[:, 0].to(per_token.device)
        return torch.zeros(len(pairs), device=per_token.device).index_add_(0, row, per_token).tolist()

    with torch.inference_mode():
        lp, target = _answer_logprobs(policy, ids, attn, mask)
        logp = sums(lp.gather(-1, target[:, None])[:, 0])
        ref_logp = kl = [None] * len(pairs)
        if ref is policy:
            ref_logp, kl = logp, [0.0] * len(pairs)
        elif ref is not None:
            device = model_device(ref)
            lq, _ = _answer_logprobs(ref, ids.to(device), attn.to(device), mask.to(device))
            lq = lq.to(lp.device)
            ref_logp, kl = sums(lq.gather(-1, target[:, None])[:, 0]), sums(token_kl(lp, lq))
    tokens = mask.sum(-1).tolist()
    return [AnswerStats(*values) for values in zip(logp, ref_logp, kl, tokens)]


def answer_stats(policy, pairs: Sequence[Pair], pad_id: int | None, batch_size: int = 16, ref=None) -> list:
    """``AnswerStats`` per pair, in input order, batched by length on the policy's device (the reference's
    logits come back to it); ``ref=policy`` costs one forward pass and gives KL 0 exactly."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
    out: list[AnswerStats | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, stats in zip(batch, _batch_stats(policy, ref, [pairs[i] for i in batch], pad_id)):
            out[i] = stats
    return out
