"""Secrets stay out: tokens in the environment (or pasted into a recipe) never reach logs, MLflow params, tags
or artifacts, the data folder or Prefect's store; a recipe cannot carry a hub token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas.recipe import RecipeError, load_recipe
from tasks.registry.secrets import MASK, redact, secret_values

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
PLANTED = {
    "HF_TOKEN": "hf_PlantedHfToken0123456789abcdef",
    "HUGGING_FACE_HUB_TOKEN": "hf_PlantedHubToken0123456789abcdef",
    "MLFLOW_TRACKING_TOKEN": "mlflow-planted-token-0123456789",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-planted-password-0123456789",
}


def test_redact_masks_env_token_values_url_passwords_and_credential_keys():
    env = {**PLANTED, "TOKENIZERS_PARALLELISM": "false", "HOME": "/home/someone-long-path"}
    data = {
        "uri": f"https://align:{PLANTED['MLFLOW_TRACKING_PASSWORD']}@mlflow.example.org/api",
        "note": f"pasted {PLANTED['HF_TOKEN']} here",
        "args": {"hub_token": "hf_not_from_env_but_a_token", "pad_token": "<pad>", "max_new_tokens": 32},
        "list": [PLANTED["MLFLOW_TRACKING_TOKEN"], 3, None],
        "plain": "https://mlflow.example.org/#/models and /home/someone-long-path",
    }
    out = redact(data, env)
    assert out["uri"] == f"https://align:{MASK}@mlflow.example.org/api"
    assert out["note"] == f"pasted {MASK} here" and out["list"] == [MASK, 3, None]
    assert out["args"] == {"hub_token": MASK, "pad_token": "<pad>", "max_new_tokens": 32}
    assert out["plain"] == data["plain"]  # HOME is no secret, a URL without a password stays
    assert secret_values(env) == sorted(PLANTED.values(), key=len, reverse=True)


def test_recipe_with_a_hub_token_in_stage_args_is_rejected_without_echoing_it():
    token = PLANTED["HF_TOKEN"]
    with pytest.raises(RecipeError, match=r"sft\.args.*hub_token.*HF_TOKEN in the environment") as e:
        load_recipe(TINY, overrides={"sft": {"args": {"hub_token": token}}})
    assert token not in str(e.value)


def _secrets_recipe(tmp_path: Path) -> Path:
    """The tiny recipe, one SFT step, absolute paths, and a tracking URI with a password pasted in (the
    environment's MLFLOW_TRACKING_URI takes precedence, so it is only ever logged, never used)."""
    data = load_recipe(TINY).model_dump(mode="json")  # paths resolved: absolute
    data["name"] = "secrets"
    data["sft"]["args"].update(max_steps=1, eval_strategy="no", save_strategy="no")
    data["mlflow"]["tracking_uri"] = f"https://align:{PLANTED['MLFLOW_TRACKING_PASSWORD']}@mlflow.invalid"
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_planted_tokens_reach_no_output_of_an_align_run(tmp_path):
    from mlflow import MlflowClient

    recipe = _secrets_recipe(tmp_path)
    state = tmp_path / "state"
    env = {
        **os.environ,
        **PLANTED,
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "PREFECT_HOME": str(state / "prefect"),
        "HF_HOME": str(state / "hf"),
        "ALIGN_STATE": str(state),
    }
    env.pop("PREFECT_API_URL", None)
    state.mkdir()
    cmd = [sys.executable, "-m", "flows.align", "--recipe", str(recipe), "--stages", "sft"]
    cmd += ["--output", str(state / "data"), "--runs", str(state / "runs")]
    out = subprocess.run(cmd, cwd=state, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    outputs = {"stdout": out.stdout.encode(), "stderr": out.stderr.encode()}
    outputs |= {str(p): p.read_bytes() for p in state.rglob("*") if p.is_file()}
    leaks = [(where, name) for name, value in PLANTED.items() for where, b in outputs.items() if value.encode() in b]
    assert leaks == []

    # The search covered what a run writes: the MLflow store with params and the recipe artifact, the stage's
    # model folder, the dataset version, and Prefect's database (flow-run logs, artifacts).
    names = {Path(p).name for p in outputs}
    assert {"mlflow.db", "prefect.db", "recipe.yaml", "manifest.json", "model.safetensors"} <= names
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    parent = client.search_runs(
        client.get_experiment_by_name("align-tiny").experiment_id, "tags.`align.recipe` = 'secrets'"
    )
    params = [r.data.params for r in parent if "mlflow.tracking_uri" in r.data.params]
    assert params and params[0]["mlflow.tracking_uri"] == f"https://align:{MASK}@mlflow.invalid"
