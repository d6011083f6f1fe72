"""The one log-prob / KL helper (tasks/training/logprobs.py) on tiny real models and real hh-rlhf rows:
batching and padding change nothing, the prompt/answer split raises naming the row, tensors follow the
model's device, the evaluation scores the token ids the policy generated, held-out models load in the
stage's dtype."""

from __future__ import annotations

import json

import pytest
import torch
from registry_helpers import build_tiny_models

from schemas.cai_config import GenerationSpec
from tasks.data.sources import hh_rlhf
from tasks.training.logprobs import PromptPrefixError, answer_stats, split_prompt_answer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer (ChatML), a reference LM and a policy LM whose weights differ from it (seeded noise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = build_tiny_models(tmp_path_factory.mktemp("logprobs"))
    tok = AutoTokenizer.from_pretrained(folders["sft"])
    ref = AutoModelForCausalLM.from_pretrained(folders["sft"]).eval()
    policy = AutoModelForCausalLM.from_pretrained(folders["sft"]).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy, ref, folders


@pytest.fixture(scope="module")
def hh_rows(shared_data):
    lines = (shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [hh_rlhf.parse(json.loads(line)) for line in lines[:6]]
    for i, r in enumerate(rows):  # real turns, each cut to 160 characters: the forward passes stay cheap
        r["id"] = f"hh-{i}"
        for m in r["prompt"] + r["chosen"] + r["rejected"]:
            m["content"] = m["content"][:160]
    return rows


def one_pair_unpadded(policy, ref, prompt_ids, answer_ids):
    """The definition, written out for one pair: no batch, no padding."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].float(), -1)[len(prompt_ids) - 1 :]
        lq = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].float(), -1)[len(prompt_ids) - 1 :]
    target = torch.tensor(answer_ids)
    kl = (lp.exp() * (lp - lq)).sum(-1).sum()
    return lp.gather(-1, target[:, None]).sum().item(), lq.gather(-1, target[:, None]).sum().item(), kl.item()


def test_answer_stats_batched_and_padded_equals_one_pair_at_a_time(tiny, hh_rows):
    tok, policy, ref, _ = tiny
    pairs = [split_prompt_answer(tok, r["prompt"], r[side]) for r in hh_rows for side in ("chosen", "rejected")]
    assert len({len(p) + len(a) for p, a in pairs}) > 3  # lengths differ: batches pad
    stats = answer_stats(policy, pairs, tok.pad_token_id, batch_size=5, ref=ref)
    for (p, a), s in zip(pairs, stats):
        logp, ref_logp, kl = one_pair_unpadded(policy, ref, p, a)
        assert s.tokens == len(a)
        assert s.logp == pytest.approx(logp, abs=1e-3) and s.ref_logp == pytest.approx(ref_logp, abs=1e-3)
        assert s.kl == pytest.approx(kl, abs=1e-3) and s.kl > 0


def test_answer_stats_reference_is_the_policy_gives_zero_kl_and_equal_logprobs(tiny, hh_rows):
    tok, policy, _, _ = tiny
    pairs = [split_prompt_answer(tok, r["prompt"], r["chosen"]) for r in hh_rows]
    for s in answer_stats(policy, pairs, tok.pad_token_id, ref=policy):
        assert s.kl == 0.0 and s.logp == s.ref_logp


def test_split_prompt_answer_answer_is_what_follows_the_generation_prompt(tiny, hh_rows):
    tok = tiny[0]
    r = hh_rows[0]
    prompt_ids, answer_ids = split_prompt_answer(tok, r["prompt"], r["chosen"])
    assert tok.decode(answer_ids) == r["chosen"][0]["content"] + "<|im_end|>\n"
    assert split_prompt_answer(tok, r["prompt"], r["chosen"][0]["content"]) == (prompt_ids, answer_ids)


def test_dpo_preference_metrics_template_without_prefix_prompt_raises_naming_the_row(tiny, hh_rows):
    """A template whose generation prompt differs from how it renders an assistant turn cannot be split: the DPO
    metrics used to score from the first differing token on silently; now they fail naming the row and the fix."""
    from tasks.training.dpo import dpo_preference_metrics

    tok, policy, ref, folders = tiny
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(folders["sft"])
    odd.chat_template = tok.chat_template.replace(
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}",
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n' }}",
    )
    assert odd.chat_template != tok.chat_template
    with pytest.raises(PromptPrefixError, match=r"test.parquet row 0 \(id hh-0, chosen\).*chat_template"):
        dpo_preference_metrics(policy, ref, odd, hh_rows, 0.1, "test.parquet")


class _Stop(Exception):
    pass


def test_answer_stats_inputs_are_built_on_the_models_device(tiny, hh_rows):
    """The model sits on the meta device (no GPU here): every tensor it receives must be there too, as they must
    be on CUDA when the generator moved the model (evaluation used to build them on the CPU)."""
    tok, _, _, folders = tiny
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["sft"]).to("meta")
    seen = []

    def record(module, args, kwargs):
        seen.extend((k, v.device.type) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        raise _Stop

    model.register_forward_pre_hook(record, with_kwargs=True)
    pairs = [split_prompt_answer(tok, r["prompt"], r["chosen"]) for r in hh_rows[:2]]
    with pytest.raises(_Stop):
        answer_stats(model, pairs, tok.pad_token_id)
    assert dict(seen) == {"input_ids": "meta", "attention_mask": "meta"}


def test_sample_kl_scores_the_generated_token_ids_not_the_decoded_text(tiny, hh_rows):
    """KL on the policy's own samples: the ids it generated after the ids it was prompted with. Replacing the
    text of every answer changes nothing (the old evaluation re-encoded the text)."""
    from dataclasses import replace

    from tasks.evaluation.stage import sample_kl
    from tasks.training.generation import HFGenerator

    tok, policy, ref, _ = tiny
    gen = HFGenerator(policy, tok, GenerationSpec(max_new_tokens=8, temperature=0.0, batch_size=4), progress=False)
    prompts = [r["prompt"] for r in hh_rows[:4]]
    outs = gen(prompts)
    assert all(o.token_ids and o.prompt_ids for o in outs)
    assert all(len(o.token_ids) == o.num_tokens for o in outs)
    kl = sample_kl(outs, policy, ref, tok.pad_token_id, batch_size=3)
    mangled = sample_kl([replace(o, text="something else entirely") for o in outs], policy, ref, tok.pad_token_id, 3)
    assert kl == mangled and kl["kl_per_token"] > 0
    direct = [one_pair_unpadded(policy, ref, o.prompt_ids, o.token_ids)[2] for o in outs]
    assert kl["kl_per_token"] == pytest.approx(sum(direct) / sum(len(o.token_ids) for o in outs), abs=1e-4)


def test_dpo_heldout_metrics_load_models_in_the_stage_dtype(tiny, tiny_recipe, tiny_dataset, monkeypatch):
    """Held-out metrics load the policy and the reference as the stage trained them (bf16 here), not always fp32."""
    import tasks.training.models as models
    from tasks.training.dpo import dpo_heldout_metrics

    _, _, _, folders = tiny
    loaded = []
    original = models.load_causal_lm

    def spy(ref, dtype="float32", *args, **kwargs):
        model = original(ref, dtype, *args, **kwargs)
        loaded.append(model.dtype)
        return model

    monkeypatch.setattr(models, "load_causal_lm", spy)
    recipe = tiny_recipe.model_copy(update={"model": tiny_recipe.model.model_copy(update={"torch_dtype": "bfloat16"})})
    metrics = dpo_heldout_metrics(recipe)(folders["sft"], str(folders["sft"]), tiny_dataset)
    assert loaded == [torch.bfloat16, torch.bfloat16]
    assert 0 <= metrics["final_reward_accuracy"] <= 1 and metrics["heldout_pairs"] > 0
