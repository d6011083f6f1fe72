"""Secrets stay out: tokens in the environment (or pasted into a recipe) never reach logs, MLflow params, tags
or artifacts, the data folder or Prefect's store; a recipe cannot carry a hub token."""

from __future__ import annotations

import ast
import json
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
    assert secret_values(env) == sorted(PLANTED.values(), key=lambda v: (-len(v), v))


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


# ------------------------------------------------------------------------------------------- remote code

CUSTOM_CODE = """import os
from pathlib import Path

Path(os.environ["ALIGN_REMOTE_CODE_MARKER"]).write_text("the repository's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "align_custom"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""


def _remote_code_model(folder: Path) -> Path:
    """A tiny Llama saved as a repository with its own modelling code (config.json auto_map → custom_llama.py),
    and a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data |= {"model_type": "align_custom", "architectures": ["CustomModel"]}
    data["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "custom_llama.py").write_text(CUSTOM_CODE)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["hello world", "what is 2 plus 2"], trainers.BpeTrainer(special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


def test_remote_code_runs_only_when_the_recipe_sets_trust_remote_code(tmp_path, monkeypatch):
    from tasks.training.models import load_causal_lm
    from tasks.training.stage import METHODS, load_for

    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("ALIGN_REMOTE_CODE_MARKER", str(marker))
    folder = _remote_code_model(tmp_path / "custom")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(folder)  # explicit False: an error, never an interactive "run the custom code? [y/N]"
    assert not marker.exists()

    default = load_recipe(TINY, overrides={"model": {"name_or_path": str(folder)}})
    assert default.model.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_for(METHODS["sft"], default, str(folder), default.sft)
    assert not marker.exists()

    allowed = load_recipe(TINY, overrides={"model": {"name_or_path": str(folder), "trust_remote_code": True}})
    model, _ = load_for(METHODS["sft"], allowed, str(folder), allowed.sft)
    assert type(model).__name__ == "CustomModel" and marker.is_file()


# Loaders that read JSON and tensors only, never a repository's Python code: PEFT adapters (over a base model
# loaded with the flag) and generation configs.
NO_CODE_LOADERS = ("PeftModel", "GenerationConfig")


def _passes_trust_remote_code(call: ast.Call, function_source: str) -> bool:
    if getattr(getattr(call.func, "value", None), "id", None) in NO_CODE_LOADERS:
        return True
    names = {k.arg for k in call.keywords}
    if "trust_remote_code" in names or "gguf_file" in names:  # a GGUF file carries no code
        return True
    return None in names and '"trust_remote_code"' in function_source  # **kwargs built with the key


def test_every_model_load_states_trust_remote_code():
    """from_pretrained / vllm.LLM without trust_remote_code may ask on a terminal whether to run a repository's
    code; every call in the pipeline passes it (False unless the recipe's model.trust_remote_code)."""
    missing = []
    for path in sorted(p for d in ("tasks", "flows", "scripts") for p in (ROOT / d).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            body = ast.get_source_segment(source, func) or ""
            for call in [n for n in ast.walk(func) if isinstance(n, ast.Call)]:
                name = getattr(call.func, "attr", getattr(call.func, "id", ""))
                if name in ("from_pretrained", "LLM") and not _passes_trust_remote_code(call, body):
                    missing.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert missing == []
