"""Registered tiny models under the README's names (tiny-dpo, tiny-reward) in a temporary MLflow store, and the
README's copy-paste commands, for the serving, chat and scoring tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from registry_helpers import FakeStage, build_tiny_models, use_temp_mlflow, write_dataset_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def register_tiny(root: Path, tiny_recipe) -> dict:
    """tiny-dpo and tiny-reward v1 (aliases candidate and champion), registered the way `align` registers them."""
    from tasks.registry import versions as registry

    uri = use_temp_mlflow(root, experiment="align-tiny")
    models = build_tiny_models(root / "models")
    stages = {s: FakeStage(s, models[s]) for s in ("dpo", "reward")}
    found = registry.register_models(tiny_recipe, stages, {}, write_dataset_dir(root / "data"), "serving-tests")
    for stage, version in found.items():
        registry.set_champion(MlflowClient(), registry.registered_name(tiny_recipe.name, stage), version)
    return {"uri": uri, "models": models, "versions": found}


def restore_tracking(previous: str) -> None:
    mlflow.set_tracking_uri(previous)


def readme_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_commands(program: str) -> list[list[str]]:
    """Shell lines of the README's bash blocks whose first words are ``program`` (continuations joined)."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().rstrip("&").strip()
            words = shlex.split(line) if line else []
            if words[: len(program.split())] == program.split():
                out.append(words)
    return out


def readme_python(marker: str) -> str:
    """The README's python block that contains ``marker``."""
    found = [b for b in readme_blocks("python") if marker in b]
    assert len(found) == 1, f"README: expected one python block with {marker!r}, found {len(found)}"
    return found[0]
