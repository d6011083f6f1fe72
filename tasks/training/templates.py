"""Chat templates: keep a model's own; otherwise ChatML (Zephyr and Llama-3 styles selectable).

Training never depends on a template's shape: SFT rows are TRL prompt/completion pairs (the completion is
the final answer), so the loss covers the answer's tokens and whatever the template puts after it up to the
next turn (ChatML: ``<|im_end|>`` and a newline) with any real template (SmolLM2, Qwen2.5, Llama 3 have no
``{% generation %}`` markers). The templates here still mark assistant turns with them, for users of TRL's
``assistant_only_loss`` elsewhere, and render a prompt as an exact prefix of prompt+answer.

``render_ids`` is the one rendering of a conversation into token ids, called the way TRL's trainers call
``apply_chat_template`` (tokenize=True): training, generation (CAI, evaluation) and length checks all go
through it, so a default system prompt a template inserts (SmolLM2's) is the same everywhere.
"""

from __future__ import annotations

from typing import Literal

TemplateName = Literal["auto", "chatml", "zephyr", "llama3", "plain"]

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"  # noqa: E501
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# For encoder reward backbones (e.g. MiniLM): plain "Role: text" lines behind the encoder's [CLS] (chat
# templates are tokenized without the tokenizer's own special tokens, and the classifier head pools [CLS]).
PLAIN = (
    "{% if cls_token is defined and cls_token %}{{ cls_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML, "zephyr": ZEPHYR, "llama3": LLAMA3, "plain": PLAIN}

# Special tokens each style needs in the vocabulary, and the token that ends an assistant turn (eos).
SPECIAL_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "zephyr": ["<|system|>", "<|user|>", "<|assistant|>", "</s>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "plain": [],
}
END_OF_TURN: dict[str, str | None] = {"chatml": "<|im_end|>", "zephyr": "</s>", "llama3": "<|eot_id|>", "plain": None}


def check_template_name(name: str) -> str:
    if name != "auto" and name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; valid: auto, {', '.join(TEMPLATES)}")
    return name


def resolve_template_name(tokenizer, requested: str = "auto") -> str | None:
    """The template to install: None keeps the tokenizer's own (``auto`` and it has one)."""
    check_template_name(requested)
    if requested == "auto":
        return None if getattr(tokenizer, "chat_template", None) else "chatml"
    return requested


def apply_chat_template_style(tokenizer, requested: str = "auto") -> list[str]:
    """Install the requested template on ``tokenizer`` (in place); return special tokens it had to add.

    A caller that gets added tokens back must resize the model's embeddings. The end-of-turn token becomes
    the eos token so generation stops at the end of an assistant turn.
    """
    name = resolve_template_name(tokenizer, requested)
    if name is None:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS[name] if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = TEMPLATES[name]
    if END_OF_TURN[name]:
        tokenizer.eos_token = END_OF_TURN[name]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return missing


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation, exactly as TRL's SFT/DPO trainers tokenize it."""
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
    )["input_ids"]


_PROBE = [{"role": "user", "content": "Hi"}]
_PROBE_ANSWER = [{"role": "assistant", "content": "Hello"}]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token that ends an assistant turn in this tokenizer's template (``<|im_end|>`` for ChatML,
    ``<|eot_id|>`` for Llama 3): the first special token the template puts after an answer; else the eos
    token; empty when there is neither (the plain template of encoders)."""
    prompt = render_ids(tokenizer, _PROBE, add_generation_prompt=True)
    full = render_ids(tokenizer, _PROBE + _PROBE_ANSWER)
    if full[: len(prompt)] == prompt:
        special = set(tokenizer.all_special_ids)
        found = next((t for t in full[len(prompt) :] if t in special), None)
        if found is not None:
            return [found]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def is_prefix_consistent(tokenizer, prompt: list[dict], answer: list[dict]) -> bool:
    """True when the rendered prompt (with generation prompt) is a prefix of the rendered prompt+answer."""
    full = render(tokenizer, list(prompt) + list(answer))
    return full.startswith(render(tokenizer, prompt, add_generation_prompt=True)) and full.startswith(
        render(tokenizer, prompt)
    )
