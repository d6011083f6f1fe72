"""Batched chat generation: a list of conversations in, one assistant answer per conversation out.

A *generator* is any ``Callable[[list[list[dict]]], list[GenOutput]]``; the CAI stage (and evaluation) only
see that, so tests inject a fake one. Two real ones:

- :class:`HFGenerator`: ``model.generate`` in batches, left padding, the recipe's sampling settings, stop
  strings, bf16 on a GPU; conversations sorted by length so a batch pads little (answers go back in input
  order). Seeded per call: the same inputs and seed give the same outputs (on CPU; GPU kernels may differ).
- :class:`VLLMGenerator`: vLLM's offline ``LLM.chat``, imported only when a recipe asks for ``backend: vllm``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas.cai_config import GenerationSpec


@dataclass(frozen=True)
class GenOutput:
    text: str
    hit_max_tokens: bool  # stopped by max_new_tokens, not by eos or a stop string: the text is truncated
    num_tokens: int = 0
    error: str | None = None  # set when nothing was generated (e.g. the conversation does not fit the context)
    prompt_ids: tuple[int, ...] = ()  # the tokens generation continued from (chat template + generation prompt)
    token_ids: tuple[int, ...] = ()  # the tokens generated, end-of-turn included: what scoring reads, not the text


Generator = Callable[[list[list[dict]]], list[GenOutput]]


@dataclass
class GenStats:
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0

    def as_metrics(self, prefix: str = "gen_") -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            f"{prefix}rows": self.rows,
            f"{prefix}tokens": self.tokens,
            f"{prefix}seconds": round(self.seconds, 3),
            f"{prefix}rows_per_s": round(self.rows / s, 3),
            f"{prefix}tokens_per_s": round(self.tokens / s, 3),
        }


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass
class HFGenerator:
    """Batched ``generate`` over chat conversations with the tokenizer's chat template."""

    model: object
    tokenizer: object
    settings: GenerationSpec
    progress: bool = True
    desc: str = "generate"
    stats: GenStats = field(default_factory=GenStats)

    def __post_init__(self):
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from tasks.training.templates import end_of_turn_ids

        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = [*end_of_turn_ids(self.tokenizer), self.tokenizer.eos_token_id]
        ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = sorted({i for i in ids if i is not None})  # end-of-turn token and the model's own eos
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def __call__(self, conversations: list[list[dict]]) -> list[GenOutput]:
        import torch
        from tqdm.auto import tqdm

        from tasks.training.templates import render_ids

        started = time.perf_counter()
        # the one rendering (templates.render_ids): the same ids, default system prompt included, as in training
        encoded = [render_ids(self.tokenizer, c, add_generation_prompt=True) for c in conversations]
        outputs: list[GenOutput | None] = [None] * len(encoded)
        todo = []
        for i, ids in enumerate(encoded):
            if self.context and len(ids) + self.settings.max_new_tokens > self.context:
                outputs[i] = GenOutput(
                    "",
                    False,
                    0,
                    f"conversation of {len(ids)} tokens + max_new_tokens "
                    f"{self.settings.max_new_tokens} > model context {self.context}",
                )
            else:
                todo.append(i)
        todo.sort(key=lambda i: (len(encoded[i]), i))  # deterministic; similar lengths share a batch
        torch.manual_seed(self.settings.seed + 1_000_003 * self.stats.calls)
        bar = tqdm(total=len(encoded), desc=self.desc, unit="row", disable=not self.progress, leave=False)
        bar.update(len(encoded) - len(todo))
        size = self.settings.batch_size
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            for i, out in zip(batch, self._generate([encoded[i] for i in batch])):
                outputs[i] = out
            bar.update(len(batch))
        bar.close()
        self.stats.calls += 1
        self.stats.rows += len(encoded)
        self.stats.tokens += sum(o.num_tokens for o in outputs)
        self.stats.seconds += time.perf_counter() - started
        return outputs

    def _generate(self, batch_ids: list[list[int]]) -> list[GenOutput]:
        import torch

        s = self.settings
        enc = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.model.device)
        sampling = s.temperature > 0
        kwargs = (
            {"do_sample": sampling, "temperature": s.temperature, "top_p": s.top_p}
            if sampling
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=s.max_new_tokens,
                eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        return [self._decode(ids, prompt) for ids, prompt in zip(new, batch_ids)]

    def _decode(self, ids: list[int], prompt_ids: list[int] = ()) -> GenOutput:
        ended = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        if ended is not None:
            ids = ids[: ended + 1]
        else:  # finished by a stop string: the rest of the row is padding
            while ids and ids[-1] == self.tokenizer.pad_token_id:
                ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, self.settings.stop)
        hit_max = ended is None and not stopped and len(ids) >= self.settings.max_new_tokens
        return GenOutput(text.strip(), hit_max, len(ids), prompt_ids=tuple(prompt_ids), token_ids=tuple(ids))


@dataclass
class VLLMGenerator:
    """vLLM offline inference (``LLM.chat``); only built when the recipe asks for ``backend: vllm``."""

    llm: object
    settings: GenerationSpec
    stats: GenStats = field(default_factory=GenStats)

    def __call__(self, conversations: list[list[dict]]) -> list[GenOutput]:
        from vllm import SamplingParams

        s = self.settings
        started = time.perf_counter()
        params = SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            stop=list(s.stop) or None,
            seed=s.seed + 1_000_003 * self.stats.calls,
        )
        results = self.llm.chat(conversations, params, use_tqdm=True)
        outs = []
        for r in results:
            c = r.outputs[0]
            outs.append(
                GenOutput(
                    c.text.strip(),
                    c.finish_reason == "length",
                    len(c.token_ids),
                    prompt_ids=tuple(r.prompt_token_ids or ()),
                    token_ids=tuple(c.token_ids),
                )
            )
        self.stats.calls += 1
        self.stats.rows += len(outs)
        self.stats.tokens += sum(o.num_tokens for o in outs)
        self.stats.seconds += time.perf_counter() - started
        return outs


class BackendUnavailable(RuntimeError):
    """The recipe asks for a generation backend that is not installed here."""


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise BackendUnavailable(
            "cai.backend: vllm is requested but the `vllm` package is not installed; "
            "install it on the GPU host (pip install vllm) or set cai.backend: hf"
        ) from None
    return vllm


def load_generator(
    model_ref: str,
    settings: GenerationSpec,
    backend: str = "hf",
    chat_template: str = "auto",
    progress: bool = True,
    desc: str = "generate",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> HFGenerator | VLLMGenerator:
    """A generator for the model at ``model_ref`` (folder or hub id, at ``revision``): bf16 on a GPU, float32
    on CPU."""
    from tasks.training.models import load_causal_lm, load_tokenizer, resolve_model_ref

    ref = resolve_model_ref(model_ref)
    if backend == "vllm":
        vllm = require_vllm()
        llm = vllm.LLM(
            model=ref, dtype="bfloat16", seed=settings.seed, revision=revision, trust_remote_code=trust_remote_code
        )
        return VLLMGenerator(llm, settings)
    import torch

    tokenizer = load_tokenizer(ref, chat_template, revision=revision, trust_remote_code=trust_remote_code)
    on_gpu = torch.cuda.is_available()
    dtype = "bfloat16" if on_gpu else "float32"
    model = load_causal_lm(ref, dtype, tokenizer=tokenizer, revision=revision, trust_remote_code=trust_remote_code)
    model.to("cuda" if on_gpu else "cpu").eval()
    return HFGenerator(model, tokenizer, settings, progress=progress, desc=desc)
