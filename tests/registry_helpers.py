"""Shared helpers for the registry/promotion tests: a temp MLflow store and tiny HF model folders."""

from __future__ import annotations

import contextlib
import json
import shutil
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


@contextlib.contextmanager
def other_store(root: Path, experiment: str = "align-tests"):
    """Track into a fresh store under ``root`` inside the block; the previous store and experiment after it."""
    previous_uri, previous_exp = (
        mlflow.get_tracking_uri(),
        mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id()),
    )
    use_temp_mlflow(root, experiment)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        mlflow.set_experiment(experiment_id=previous_exp.experiment_id)


def log_stage_run(model_dir: Path, stage: str, metrics: dict | None = None) -> str:
    """A stage run of the current store as tasks/training/stage.py logs it (metrics, ``model/``); its id."""
    with mlflow.start_run(run_name=stage) as run:
        mlflow.log_metrics(metrics or {})
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    return run.info.run_id


def tracked_stage_folder(model_dir: Path, stage_dir: Path, stage: str, metrics: dict) -> str:
    """A finished stage folder (``model/`` + result.json) tracked as a run of the current store; its run id."""
    shutil.copytree(model_dir, stage_dir / "model")
    run_id = log_stage_run(stage_dir / "model", stage, metrics)
    result = {"stage": stage, "method": stage, "base_model": "tiny", "metrics": metrics, "run_id": run_id}
    (stage_dir / "result.json").write_text(json.dumps(result))
    return run_id


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
