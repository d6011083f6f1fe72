"""Registration against a real MLflow (sqlite in a temp dir): versions, tags, aliases, idempotency, loading."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from registry_helpers import (
    FakeStage,
    build_tiny_models,
    other_store,
    tracked_stage_folder,
    use_temp_mlflow,
    write_dataset_dir,
)

from tasks.registry import versions as registry

METRICS = {"rm_accuracy": 0.75, "win_rate": 0.6, "kl_per_token": 0.05}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    use_temp_mlflow(root)
    models = build_tiny_models(root / "models")
    yield {"root": root, "models": models, "dataset": write_dataset_dir(root / "data")}
    mlflow.set_tracking_uri(previous)


def _recipe(tiny_recipe, name):
    return tiny_recipe.model_copy(update={"name": name})


def test_register_models_new_flow_run_creates_versions_with_tags_and_candidate(store, tiny_recipe):
    results = {s: FakeStage(s, store["models"][s]) for s in ("sft", "reward", "dpo")}
    versions = registry.register_models(_recipe(tiny_recipe, "reg"), results, METRICS, store["dataset"], "run-1")
    assert versions == {"sft": 1, "reward": 1, "dpo": 1}
    client = MlflowClient()
    mv = client.get_model_version("reg-dpo", "1")
    assert mv.aliases == ["candidate"]
    assert mv.tags["flow_run_id"] == "run-1" and mv.tags["stage"] == "dpo"
    assert mv.tags["dataset_version"] == "v-test" and mv.tags["contract_success"] == "true"
    assert mv.tags["recipe_hash"] == tiny_recipe.model_copy(update={"name": "reg"}).recipe_hash()
    assert len(mv.tags["git_commit"]) >= 7
    assert float(mv.tags["eval.rm_accuracy"]) == 0.75
    assert registry.version_metrics(mv)["kl_per_token"] == 0.05


def test_register_models_same_flow_run_twice_adds_no_version(store, tiny_recipe):
    recipe = _recipe(tiny_recipe, "idem")
    results = {"dpo": FakeStage("dpo", store["models"]["dpo"])}
    first = registry.register_models(recipe, results, METRICS, store["dataset"], "run-a")
    again = registry.register_models(recipe, results, METRICS, store["dataset"], "run-a")
    other = registry.register_models(recipe, results, METRICS, store["dataset"], "run-b")
    assert first == again == {"dpo": 1} and other == {"dpo": 2}
    assert len(MlflowClient().search_model_versions("name = 'idem-dpo'")) == 2
    assert registry.alias_version(MlflowClient(), "idem-dpo", "candidate") == 2


def test_rollback_champion_after_two_promotions_restores_previous(store, tiny_recipe):
    recipe = _recipe(tiny_recipe, "roll")
    client = MlflowClient()
    for run in ("r1", "r2"):
        v = registry.register_models(
            recipe, {"dpo": FakeStage("dpo", store["models"]["dpo"])}, METRICS, store["dataset"], run
        )["dpo"]
        registry.set_champion(client, "roll-dpo", v)
    assert registry.champion_history(client, "roll-dpo") == [1, 2]
    assert registry.rollback_champion(client, "roll-dpo") == (2, 1)
    assert registry.alias_version(client, "roll-dpo", "champion") == 1
    assert registry.champion_history(client, "roll-dpo") == [1]
    assert "promotion.rolled_back_at" in client.get_model_version("roll-dpo", "2").tags
    with pytest.raises(ValueError, match="no previous champion"):
        registry.rollback_champion(client, "roll-dpo")


def test_load_champion_documented_one_liners_return_working_model(store, tiny_recipe):
    recipe = _recipe(tiny_recipe, "load")
    v = registry.register_models(
        recipe, {"dpo": FakeStage("dpo", store["models"]["dpo"])}, METRICS, store["dataset"], "run-load"
    )["dpo"]
    registry.set_champion(MlflowClient(), "load-dpo", v)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the documented one-liner (README, tasks/registry/versions.py): the stage's HF folder inside the MLflow model
    folder = mlflow.artifacts.download_artifacts("models:/load-dpo@champion/artifacts/hf")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "2 plus 2"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_register_models_stage_run_with_model_artifacts_registers_that_run(store, tiny_recipe):
    with mlflow.start_run(run_name="dpo") as run:
        mlflow.log_artifacts(str(store["models"]["dpo"]), artifact_path="model")
    v = registry.register_models(
        _recipe(tiny_recipe, "fromrun"),
        {"dpo": FakeStage("dpo", store["models"]["dpo"], run.info.run_id)},
        METRICS,
        store["dataset"],
        "run-x",
    )["dpo"]
    mv = MlflowClient().get_model_version("fromrun-dpo", str(v))
    assert mv.run_id == run.info.run_id and mv.source == f"runs:/{run.info.run_id}/model"


def test_register_models_reused_stage_in_new_flow_run_adds_no_version(store, tiny_recipe):
    """An unchanged re-run reuses the stage (same stage run): the model is registered once."""
    with mlflow.start_run(run_name="dpo") as run:
        mlflow.log_artifacts(str(store["models"]["dpo"]), artifact_path="model")
    recipe, stage = _recipe(tiny_recipe, "rerun"), FakeStage("dpo", store["models"]["dpo"], run.info.run_id)
    first = registry.register_models(recipe, {"dpo": stage}, METRICS, store["dataset"], "flow-1")
    second = registry.register_models(recipe, {"dpo": stage}, METRICS, store["dataset"], "flow-2")
    assert first == second == {"dpo": 1}
    assert len(MlflowClient().search_model_versions("name = 'rerun-dpo'")) == 1


def test_promote_version_already_champion_keeps_it_and_history(store, tiny_recipe):
    recipe, client = _recipe(tiny_recipe, "keep"), MlflowClient()
    v = registry.register_models(
        recipe, {"dpo": FakeStage("dpo", store["models"]["dpo"])}, METRICS, store["dataset"], "run-k"
    )["dpo"]
    registry.set_champion(client, "keep-dpo", v)
    record = registry.promote_version("keep-dpo", v, recipe.promote)
    assert record["action"] == "keep" and "already the champion" in record["markdown"]
    assert registry.champion_history(client, "keep-dpo") == [v]


def test_register_models_stage_run_missing_from_store_relogged_from_folder_and_registered_once(
    store, tiny_recipe, tmp_path
):
    """A stage folder tracked in store A, reused while store B is current (another MLFLOW_TRACKING_URI or
    `.align/` deleted): B gets a run logged from the folder and one version, not `Run ... not found`."""
    stage_dir = tmp_path / "dpo-key"
    with other_store(tmp_path / "store-a"):
        run_a = tracked_stage_folder(store["models"]["dpo"], stage_dir, "dpo", {"final_reward_accuracy": 0.7})
    recipe, stage = _recipe(tiny_recipe, "moved"), FakeStage("dpo", stage_dir / "model", run_a)
    first = registry.register_models(recipe, {"dpo": stage}, METRICS, store["dataset"], "flow-b1")
    again = registry.register_models(recipe, {"dpo": stage}, METRICS, store["dataset"], "flow-b2")
    assert first == again == {"dpo": 1}
    client = MlflowClient()
    mv = client.get_model_version("moved-dpo", "1")
    assert mv.run_id != run_a and mv.source == f"runs:/{mv.run_id}/model"
    run = client.get_run(mv.run_id)
    assert run.data.tags["align.relogged_from"] == run_a and run.data.tags["align.stage"] == "dpo"
    assert run.data.metrics == {"final_reward_accuracy": 0.7} and run.data.params["method"] == "dpo"
    assert client.list_artifacts(mv.run_id, "model")  # the folder, as tracking.log_model_folder logs it
    assert len(client.search_runs([run.info.experiment_id], f"tags.`align.relogged_from` = '{run_a}'")) == 1
