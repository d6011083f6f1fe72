"""Benchmark (not a test): CAI generation throughput, batched HFGenerator vs a plain per-prompt generate loop.

    .venv/bin/python -m benchmarks.cai_generation                      # CPU, tiny model (recipes/tiny.yaml)
    .venv/bin/python -m benchmarks.cai_generation --shape 0.5b         # GPU: Qwen2-0.5B shape, random init, bf16

Both sides run the same three CAI rounds (initial → critique → revision) on the same prompts with the same
settings; stop strings are off and eos is suppressed (min_new_tokens = max_new_tokens) so every row
generates exactly max_new_tokens and rows/s and tokens/s compare like for like. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QWEN_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def build_model(shape: str, work: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from schemas.recipe import load_recipe
    from tasks.data.dataset import build_dataset
    from tasks.training.models import bootstrap_tiny, load_tokenizer

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    ds = build_dataset(recipe, work / "data").path
    tiny = bootstrap_tiny(recipe.model, ds / "train.parquet", work / "tiny")
    tokenizer = load_tokenizer(tiny)
    if shape == "tiny":
        model = AutoModelForCausalLM.from_pretrained(tiny)
    else:  # 0.5B shape with the tiny tokenizer's vocabulary (random init: throughput only)
        config = AutoConfig.for_model(
            "qwen2",
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **QWEN_05B,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    return model, tokenizer, ds


def prompts(n: int) -> list[list[dict]]:
    lines = [x for x in (ROOT / "examples" / "data" / "red_team.txt").read_text().splitlines() if x.strip()]
    hh = [
        t.split("\n\nHuman: ")[1].split("\n\nAssistant:")[0]
        for x in (ROOT / "examples" / "data" / "hh-rlhf.jsonl").read_text().splitlines()
        if "\n\nHuman: " in (t := json.loads(x).get("chosen") or "")
    ]  # the demo file has a few bad rows
    texts = list(dict.fromkeys(lines + hh))[:n]
    return [[{"role": "user", "content": t}] for t in texts]


def three_rounds(generate, convs, principle) -> float:
    started = time.perf_counter()
    initial = generate(convs)
    convs = [
        c + [{"role": "assistant", "content": o.text}, {"role": "user", "content": principle.critique}]
        for c, o in zip(convs, initial)
    ]
    critique = generate(convs)
    convs = [
        c + [{"role": "assistant", "content": o.text}, {"role": "user", "content": principle.revision}]
        for c, o in zip(convs, critique)
    ]
    generate(convs)
    return time.perf_counter() - started


def plain_loop(model, tokenizer, settings):
    """The baseline: one generate call per conversation, no padding, no batching."""
    import torch

    from tasks.training.generation import GenOutput

    def generate(convs):
        outs = []
        for c in convs:
            ids = tokenizer.apply_chat_template(
                c, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(model.device)
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    max_new_tokens=settings.max_new_tokens,
                    min_new_tokens=settings.max_new_tokens,
                    do_sample=True,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[0, ids["input_ids"].shape[1] :]
            outs.append(GenOutput(tokenizer.decode(new, skip_special_tokens=True), True, len(new)))
        generate.tokens += sum(o.num_tokens for o in outs)
        return outs

    generate.tokens = 0
    return generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from schemas.cai_config import GenerationSpec
    from schemas.constitution import load_constitution
    from tasks.training.generation import HFGenerator

    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=0.7)
    principle = load_constitution(ROOT / "recipes" / "constitutions" / "hhh.yaml").principles[0]
    with tempfile.TemporaryDirectory() as work:
        model, tokenizer, _ = build_model(args.shape, Path(work))
        model.generation_config.min_new_tokens = args.max_new_tokens  # every row the same length: fair rates
        convs = prompts(args.prompts)
        batched = HFGenerator(model, tokenizer, settings, progress=False)
        three_rounds(batched, convs[:2], principle)  # warm-up (kernels, allocator)
        batched.stats.__init__()
        t_batched = three_rounds(batched, convs, principle)
        loop = plain_loop(model, tokenizer, settings)
        t_loop = three_rounds(loop, convs, principle)
    rows = 3 * len(convs)
    report = {
        "shape": args.shape,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "prompts": len(convs),
        "generations": rows,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "batched": {
            "seconds": round(t_batched, 2),
            "rows_per_s": round(rows / t_batched, 2),
            "tokens_per_s": round(batched.stats.tokens / t_batched, 1),
        },
        "plain_loop": {
            "seconds": round(t_loop, 2),
            "rows_per_s": round(rows / t_loop, 2),
            "tokens_per_s": round(loop.tokens / t_loop, 1),
        },
        "speedup": round(t_loop / t_batched, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
