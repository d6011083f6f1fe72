"""Shared helpers for the registry/promotion tests: a temp MLflow store and tiny HF model folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow


@dataclass
class FakeStage:
    """The fields of tasks.training.stage.StageResult that registration reads."""

    stage: str
    model_dir: Path
    run_id: str | None = None


def use_temp_mlflow(root: Path, experiment: str = "align-tests") -> str:
    """Point MLflow at a fresh sqlite DB + artifact folder under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment)
    return uri


def build_tiny_models(root: Path) -> dict[str, Path]:
    """A causal LM folder (sft/dpo) and a 1-label classifier folder (reward), hidden 32, 2 layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.training.models import build_tiny_tokenizer

    texts = ["What is 2 plus 2?", "2 plus 2 is 4.", "The capital of Italy is Rome.", "I cannot help."] * 25
    tok = build_tiny_tokenizer(texts, vocab_size=300)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    out = {}
    for stage, cls in (
        ("sft", AutoModelForCausalLM),
        ("dpo", AutoModelForCausalLM),
        ("reward", AutoModelForSequenceClassification),
    ):
        torch.manual_seed(len(stage))
        if stage == "reward":
            cfg.num_labels = 1
        model = cls.from_config(cfg)
        folder = root / stage / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[stage] = folder
    return out


def write_dataset_dir(root: Path, version: str = "v-test", success: bool = True) -> Path:
    d = root / version
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"version": version, "contract": {"success": success}}))
    return d
