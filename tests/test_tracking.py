"""MLflow tracking helpers: store selection, flattened params, nesting across threads, curves."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from schemas.recipe import Recipe, deep_merge, load_recipe
from tasks.registry import tracking

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _recipe(**mlflow) -> Recipe:
    base = load_recipe(TINY)
    return Recipe.model_validate(deep_merge(base.model_dump(mode="json"), {"mlflow": mlflow} if mlflow else {}))


def test_tracking_uri_environment_overrides_recipe_which_overrides_default(monkeypatch, tmp_path):
    recipe = _recipe(tracking_uri=f"sqlite:///{tmp_path}/recipe.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert tracking.tracking_uri(recipe).endswith("env.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(recipe).endswith("recipe.db")
    monkeypatch.setattr(tracking, "DEFAULT_DB", tmp_path / ".align" / "mlflow.db")
    assert tracking.tracking_uri(_recipe()) == f"sqlite:///{tmp_path}/.align/mlflow.db"


def test_flatten_nested_recipe_gives_dotted_string_params():
    flat = tracking.flatten(
        {"sft": {"args": {"max_steps": 40, "loss_type": ["sigmoid", "ipo"]}, "lora": None}, "sources": []}
    )
    assert flat == {
        "sft.args.max_steps": "40",
        "sft.args.loss_type.0": "sigmoid",
        "sft.args.loss_type.1": "ipo",
        "sft.lora": "None",
        "sources": "[]",
    }


def test_stage_run_started_on_another_thread_nests_under_the_pipeline_run(tmp_path):
    """Prefect may run a task on a worker thread; MLflow's active run is per thread."""
    from mlflow import MlflowClient

    recipe = _recipe(experiment="tracking-test")
    child: dict = {}

    def stage():
        with tracking.stage_run("sft", recipe, params={"method": "sft"}) as run_id:
            tracking.log_summary({"train_loss_min": 1.5, "flag": True})
            child["id"] = run_id

    with tracking.start_pipeline_run(recipe) as parent:
        t = threading.Thread(target=stage)
        t.start()
        t.join()
    client = MlflowClient()
    run = client.get_run(child["id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics == {"train_loss_min": 1.5} and run.data.params["method"] == "sft"
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(parent)}
    assert tracking.PARENT_ENV not in __import__("os").environ


def test_log_curves_writes_a_png_per_plot_with_data_and_skips_empty_ones():
    import mlflow
    from mlflow import MlflowClient

    recipe = _recipe(experiment="tracking-test")
    history = [{"step": s, "loss": 1.0 / s, "rewards/margins": 0.1 * s} for s in range(1, 6)]
    history.append({"step": 5, "eval_loss": 0.3})
    tracking.setup(recipe)
    with mlflow.start_run() as run:
        written = tracking.log_curves(
            history,
            {"loss": ["loss", "eval_loss"], "reward_margin": ["rewards/margins"], "accuracy": ["rewards/accuracies"]},
        )
    assert written == ["plots/loss.png", "plots/reward_margin.png"]
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert names == {"plots/loss.png", "plots/reward_margin.png"}


@pytest.mark.slow
def test_train_stage_reused_against_another_store_gets_a_run_there_with_its_model(tiny_dataset, tmp_path):
    """`.align/` deleted or MLFLOW_TRACKING_URI changed between two runs of one recipe: the reused stage's
    result.json names a run of the old store; the stage is logged into the new one (once) and registers."""
    from mlflow import MlflowClient
    from registry_helpers import FakeStage, other_store

    from tasks.registry import versions
    from tasks.training.sft import train_sft

    recipe = Recipe.model_validate(
        deep_merge(
            _recipe().model_dump(mode="json"),
            {"name": "moved", "sft": {"args": {"max_steps": 1, "eval_strategy": "no", "save_strategy": "no"}}},
        )
    )
    with other_store(tmp_path / "a"):
        trained = train_sft(recipe, tiny_dataset, None, tmp_path / "runs")
    with other_store(tmp_path / "b"):
        reused = train_sft(recipe, tiny_dataset, None, tmp_path / "runs")
        again = train_sft(recipe, tiny_dataset, None, tmp_path / "runs")
        stage = FakeStage("sft", reused.model_dir, reused.run_id)
        version = versions.register_models(recipe, {"sft": stage}, {}, tiny_dataset, "flow-b")["sft"]
        client = MlflowClient()
        run = client.get_run(reused.run_id)
        mv = client.get_model_version("moved-sft", str(version))
    assert reused.reused and reused.run_id != trained.run_id and again.run_id == reused.run_id
    assert run.data.tags["align.relogged_from"] == trained.run_id
    assert run.data.params["args.max_steps"] == "1" and run.data.metrics["global_step"] == 1
    assert run.inputs.dataset_inputs and mv.run_id == reused.run_id
