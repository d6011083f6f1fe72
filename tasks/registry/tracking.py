"""MLflow tracking for the training path: runs, params, per-step metrics, plots, dataset lineage.

One parent run per pipeline run, one nested run per stage. The model *registry* is not here
(tasks/registry.py owns registered models, aliases and promotion).

Per-step metrics go through our own callback (tasks/step_metrics.py, imported only when a stage
trains: subclassing transformers' TrainerCallback imports torch) rather than transformers' MLflowCallback:
that one starts/ends runs itself from environment variables and logs every TrainingArguments field as a
param, which fights the parent/nested layout; ours logs into whatever run is active and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import yaml

from schemas.hashing import content_hash
from schemas.recipe import PROJECT_ROOT
from tasks.registry.secrets import redact

DEFAULT_DB = PROJECT_ROOT / ".align" / "mlflow.db"
PARENT_ENV = "ALIGN_PARENT_RUN_ID"
RELOGGED_FROM = "align.relogged_from"  # tag of a stage run logged again into another store: the original run id


def tracking_uri(recipe=None) -> str:
    """MLFLOW_TRACKING_URI (environment) > recipe ``mlflow.tracking_uri`` > sqlite file under .align/."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if recipe is not None and recipe.mlflow.tracking_uri:
        return recipe.mlflow.tracking_uri
    DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DB}"


class TrackingStoreError(ValueError):
    """The tracking store cannot be written; the message names its path and the fix."""


def local_store_path(uri: str) -> Path | None:
    """The database file or folder of a local tracking store (``sqlite:///``, ``file:``, a plain path), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    return None if "://" in uri else Path(uri)


def check_store(recipe=None) -> None:
    """Fail before any work, in one line naming the path, when the local tracking store cannot be written (a
    read-only folder or database): MLflow would raise only after ingest and training, as a traceback, with
    nothing to register into. A remote store (http, databricks) is its server's to judge."""
    try:
        uri = tracking_uri(recipe)
    except OSError as e:  # the default store's folder (.align/) cannot be created
        raise TrackingStoreError(f"{DEFAULT_DB.parent}: cannot create the tracking store: {e.strerror}") from None
    path = local_store_path(uri)
    if path is None:
        return
    folder = path.parent if uri.startswith("sqlite:") else path
    existing = next(p for p in (folder, *folder.parents) if p.is_dir())  # where the first file would be created
    probes = [existing, *([folder / "mlartifacts"] if (folder / "mlartifacts").is_dir() else [])]
    probing = path
    try:
        if path.is_file():
            open(path, "r+b").close()  # opened for writing, nothing written
        for probing in probes:
            tempfile.TemporaryFile(dir=probing).close()
    except OSError as e:
        from_recipe = not os.environ.get("MLFLOW_TRACKING_URI") and recipe is not None and recipe.mlflow.tracking_uri
        where = "the recipe's mlflow.tracking_uri (or MLFLOW_TRACKING_URI)" if from_recipe else "MLFLOW_TRACKING_URI"
        raise TrackingStoreError(
            f"{probing}: the MLflow tracking store is not writable ({e.strerror}); "
            f"point {where} at a writable location"
        ) from None


def store_lock(what: str):
    """The lock of the current tracking store between runs, for its creation and registry writes (register,
    promote): beside a local store, else under .align/locks/ (this host only)."""
    import mlflow

    from tasks.runtime.locks import exclusive

    uri = mlflow.get_tracking_uri()
    path = local_store_path(uri)
    if path is None:
        lock = PROJECT_ROOT / ".align" / "locks" / f"{content_hash(uri)}.lock"
    else:
        lock = path.with_name(f"{path.name}.lock") if uri.startswith("sqlite:") else path / ".align-store.lock"
    return exclusive(lock, f"{what} ({path or 'the tracking store'})")


def _artifact_root(uri: str) -> str | None:
    """With a sqlite backend MLflow writes artifacts to ./mlruns of the cwd; put them beside the DB instead."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def setup(recipe) -> str:
    """Point MLflow at the recipe's store and experiment; returns the experiment id."""
    return use_experiment(recipe.mlflow.experiment, recipe)


def use_experiment(name: str, recipe=None) -> str:
    """Point MLflow at the store (``tracking_uri(recipe)``) and experiment ``name``; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(recipe)
    mlflow.set_tracking_uri(uri)
    # Two runs on a fresh store would both create its tables (MLflow's migrations then fail in one of them) and
    # both create the experiment: one does, the other waits and finds them.
    with store_lock("tracking store setup"):
        exp = mlflow.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(name, artifact_location=_artifact_root(uri))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Nested dict/list → {"a.b.0.c": "value"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else None
    if items is None:
        return {prefix: str(obj)[:6000]}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if not out and prefix:
        out[prefix] = "[]" if isinstance(obj, list) else "{}"
    return out


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_dataset_version(dataset_dir: Path) -> str:
    manifest = Path(dataset_dir) / "manifest.json"
    if manifest.is_file():
        return str(json.loads(manifest.read_text(encoding="utf-8")).get("version", Path(dataset_dir).name))
    return Path(dataset_dir).name


def log_dataset_inputs(
    recipe, dataset_dir: Path, splits=("train", "validation", "test"), extra: list[Path] = ()
) -> None:
    """Lineage: each split as an mlflow.data input (digest = dataset version) + the manifest artifact."""
    import mlflow
    import pyarrow.parquet as pq

    dataset_dir = Path(dataset_dir)
    version = read_dataset_version(dataset_dir)
    files = [(s, dataset_dir / f"{s}.parquet") for s in splits] + [(f"extra-{p.stem}", Path(p)) for p in extra]
    for split, path in files:
        if not path.is_file():
            continue
        # The id/provenance columns only: ids are content hashes, so they pin the rows without copying them.
        df = pq.read_table(path, columns=["id", "source", "source_row", "prompt_hash"]).to_pandas()
        ds = mlflow.data.from_pandas(
            df, source=str(path.resolve()), name=f"{recipe.name}/{version}/{split}", digest=f"{version}-{split}"[:36]
        )
        mlflow.log_input(ds, context={"validation": "validation", "test": "eval"}.get(split, "training"))
    manifest = dataset_dir / "manifest.json"
    if manifest.is_file():
        mlflow.log_artifact(str(manifest), artifact_path="dataset")


@contextlib.contextmanager
def start_pipeline_run(recipe, dataset_dir: Path | None = None, run_name: str | None = None):
    """Parent run of one pipeline run: resolved recipe (flattened params + YAML artifact), tags, lineage."""
    import mlflow

    setup(recipe)
    recipe_dict = redact(recipe.model_dump(mode="json"))  # a token pasted into a recipe shows as ***
    tags = {"align.recipe": recipe.name, "align.recipe_hash": recipe.recipe_hash(), "align.git_sha": git_sha()}
    if dataset_dir is not None:
        tags["align.dataset_version"] = read_dataset_version(dataset_dir)
    with mlflow.start_run(run_name=run_name or f"{recipe.name}-pipeline", tags=redact(tags)) as run:
        mlflow.log_params(flatten(recipe_dict))
        mlflow.log_text(yaml.safe_dump(recipe_dict, sort_keys=False), "recipe.yaml")
        if dataset_dir is not None:
            log_dataset_inputs(recipe, dataset_dir)
        # MLflow's active-run stack is per thread; a Prefect task may run on another one, so stage runs
        # also find their parent through the environment.
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            os.environ.pop(PARENT_ENV) if previous is None else os.environ.__setitem__(PARENT_ENV, previous)


@contextlib.contextmanager
def stage_run(name: str, recipe, dataset_dir: Path | None = None, params: dict | None = None, extra: list[Path] = ()):
    """A stage's run: nested under the active pipeline run, or top-level when the stage runs alone."""
    import mlflow

    active = mlflow.active_run()
    parent = active.info.run_id if active else os.environ.get(PARENT_ENV)
    if active is None:
        setup(recipe)
    tags = {"align.stage": name, "align.recipe": recipe.name, "align.git_sha": git_sha()}
    if dataset_dir is not None:
        tags["align.dataset_version"] = read_dataset_version(dataset_dir)
    nested = {"nested": True} if active else {"parent_run_id": parent} if parent else {}
    with mlflow.start_run(run_name=name, tags=redact(tags), **nested) as run:
        if params:
            mlflow.log_params(flatten(redact(params)))
        if dataset_dir is not None:
            log_dataset_inputs(recipe, dataset_dir, extra=list(extra))
        yield run.info.run_id


def metric_name(key: str) -> str:
    # MLflow allows / . - _ and spaces; anything else (e.g. parentheses) becomes "_".
    return "".join(c if c.isalnum() or c in "/._- " else "_" for c in key)


def curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [float(p[1]) for p in points]


def log_curves(history: list[dict], plots: dict[str, list[str]]) -> list[str]:
    """One PNG per entry of ``plots`` ({file stem: [metric keys]}); keys absent from the history are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    written = []
    for stem, keys in plots.items():
        series = {k: curve(history, k) for k in keys}
        series = {k: v for k, v in series.items() if v[0]}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=k)
        ax.set_xlabel("step")
        ax.set_title(stem)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        mlflow.log_figure(fig, f"plots/{stem}.png")
        plt.close(fig)
        written.append(f"plots/{stem}.png")
    return written


def log_summary(metrics: dict) -> None:
    import mlflow

    mlflow.log_metrics(
        {
            metric_name(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )


def log_model_folder(model_dir: Path, artifact_path: str = "model") -> None:
    """The final HF folder as an MLflow model (a pyfunc that chats or scores, tasks/serving/pyfunc.py), the folder
    itself at ``<artifact_path>/artifacts/hf``, uploaded once and never loaded."""
    from tasks.serving.pyfunc import log_hf_model

    log_hf_model(model_dir, artifact_path)


# ---------------------------------------------------------------- a stage folder that outlives its store


def stage_params(recipe, section: str, method: str, base_model: str) -> dict:
    """The params of a stage run (its training run, and a re-log of it into another store)."""
    return {"method": method, "base_model": base_model, **getattr(recipe, section).model_dump(mode="json")}


def run_in_store(client, run_id: str) -> bool:
    """Whether the current tracking store holds ``run_id`` (and it is not deleted)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise  # an unreachable store is not a missing run


def stage_run_here(recipe, section: str, stage_dir: Path, run_id: str | None, dataset_dir: Path | None) -> str | None:
    """The run of a finished stage in the *current* tracking store, logging it there again when missing.

    A stage folder outlives the store it was tracked in (another ``MLFLOW_TRACKING_URI``, ``.align/``
    deleted): its result.json then names a run this store has never seen, and registering it would fail.
    Such a stage is logged here again from its folder (params, summary metrics, dataset lineage, the model
    folder) in a run tagged ``align.relogged_from=<original id>``; the tag, set last, finds that run the next
    time, so one folder gets one run per store. A stage run outside MLflow (``run_id`` None) stays None.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if run_id is None:
        return None
    if mlflow.active_run() is None:
        setup(recipe)
    if run_in_store(MlflowClient(), run_id):
        return run_id
    from tasks.runtime.locks import folder_lock

    with folder_lock(stage_dir, f"{section}: {stage_dir} logged into this store"):  # by one of two concurrent runs
        earlier = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`{RELOGGED_FROM}` = '{run_id}'",
            output_format="list",
            max_results=1,
        )
        if earlier:
            return earlier[0].info.run_id
        return _relog_stage(recipe, section, Path(stage_dir), run_id, dataset_dir)


def _relog_stage(recipe, section: str, stage_dir: Path, run_id: str, dataset_dir: Path | None) -> str:
    import mlflow

    model_dir = stage_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: stage `{section}` names MLflow run {run_id}, missing from the current store, and its "
            "model folder is gone too; delete the stage folder so the stage trains again"
        )
    result_file = stage_dir / "result.json"
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    params = stage_params(recipe, section, result.get("method", section), result.get("base_model", "unknown"))
    with stage_run(section, recipe, dataset_dir, params) as new_id:
        log_summary(result.get("metrics", {}))
        log_model_folder(model_dir)
        mlflow.set_tag(RELOGGED_FROM, run_id)
    return new_id
