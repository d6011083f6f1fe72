"""MLflow Model Registry: the only module that writes to it (STYLE rule 12), and only after evaluation.

- ``register_models``: each stage's HF folder becomes a new version of ``<recipe>-<stage>``, tagged with
  dataset version, recipe hash, git commit, Prefect flow run id, the evaluation metrics (``eval.*``) and the
  recipe's promotion gates, with alias ``candidate``. Idempotent on (flow run id, stage): a retried flow
  run finds its version by tag and registers nothing new.
- ``set_champion`` / ``rollback_champion``: move alias ``champion``; the registered model's tag
  ``champion_history`` (JSON list of versions, oldest first) is the history a rollback walks back.
- ``record_decision``: the promotion decision as version tags (``promotion.*``) and a JSON artifact.

Loading what is registered (each version is an MLflow model, tasks/serving/pyfunc.py, with the stage's HF
folder, model + tokenizer, at ``artifacts/hf``):
    path = mlflow.artifacts.download_artifacts("models:/tiny-dpo@champion/artifacts/hf")
    AutoModelForCausalLM.from_pretrained(path)

Aliases, not stages (deprecated in MLflow 3). ``search_model_versions`` returns empty ``aliases`` in 3.17,
so alias lookups go through ``get_model_version_by_alias``/``get_model_version``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.registry.tracking import git_sha, log_model_folder, stage_run_here, store_lock
from tasks.runtime.faults import fault_point
from tasks.runtime.retries import retry_on_transient_io

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
HISTORY_TAG = "champion_history"
ROLLED_BACK_TAG = "promotion.rolled_back_at"  # on a version rolled back from champion: never a candidate again
EVAL_PREFIX = "eval."
EVALUATED_IN = "evaluated_in_flow_run"  # the flow run whose evaluation the version's eval.* tags are


def registered_name(recipe_name: str, stage: str) -> str:
    return f"{recipe_name}-{stage}"


def dataset_lineage(dataset_dir: Path) -> dict[str, str]:
    """Dataset version and contract result from the dataset's manifest.json."""
    from tasks.registry.gates import contract_ok

    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text(encoding="utf-8"))
    return {
        "dataset_version": str(manifest.get("version", Path(dataset_dir).name)),
        "contract_success": str(contract_ok(manifest)).lower(),
    }


# ---------------------------------------------------------------- registration


def find_version(client: MlflowClient, name: str, flow_run_id: str, stage: str) -> int | None:
    """The version a flow run already registered for a stage, if any (the idempotency key)."""
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tag.flow_run_id = '{flow_run_id}' and tag.stage = '{stage}'"
        )
    except MlflowException:  # registered model does not exist yet
        return None
    return min((int(v.version) for v in found), default=None)


def versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[int]:
    """Versions of ``name`` registered from the stage run ``run_id`` (the same trained model), oldest first."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:  # registered model does not exist yet
        return []
    return sorted(int(v.version) for v in found)


def model_source(client: MlflowClient, model_dir: Path, stage: str, run_id: str | None) -> tuple[str, str]:
    """The registry source of a stage's HF folder: ``runs:/<run>/model`` and that run's id.

    Each stage logs its final folder as an MLflow model under ``model/`` (tracking.log_model_folder: a pyfunc,
    the HF folder at ``model/artifacts/hf``); that is what gets registered (runs from before that hold the plain
    folder, ``model/config.json``, and register as they are). A result without such a run (a stage run outside
    MLflow) has its folder logged the same way, in a run of its own.
    """
    logged = {"model/MLmodel", "model/config.json"}
    if run_id and any(f.path in logged for f in client.list_artifacts(run_id, "model")):
        return f"runs:/{run_id}/model", run_id
    with mlflow.start_run(run_name=f"register-{stage}", nested=mlflow.active_run() is not None) as run:
        log_model_folder(model_dir)
    return f"runs:/{run.info.run_id}/model", run.info.run_id


def _metric_tags(metrics: dict) -> dict[str, str]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[EVAL_PREFIX + k] = f"{float(v):.6g}"
    return out


def register_stage(
    client: MlflowClient, name: str, stage: str, model_dir: Path, run_id: str | None, tags: dict[str, str]
) -> tuple[int, bool]:
    """Register one stage's folder (or find the version this flow run registered). Returns (version, new)."""
    existing = find_version(client, name, tags["flow_run_id"], stage)
    if existing is not None:
        return existing, False
    source, source_run = model_source(client, Path(model_dir), stage, run_id)
    same_model = versions_of_run(client, name, source_run)
    if same_model:  # a reused stage (unchanged re-run): the model is registered already, one version per model
        return same_model[-1], False
    try:
        client.create_registered_model(
            name,
            description=f"align `{stage}` models of recipe `{tags['recipe_name']}`"
            " (HF folders; load: see README 'Loading the champion')",
        )
    except MlflowException:
        pass  # already exists
    mv = client.create_model_version(
        name, source, run_id=source_run, tags={**tags, "stage": stage}, description=_describe(tags)
    )
    return int(mv.version), True


def write_evaluation_tags(client: MlflowClient, name: str, version: int, tags: dict[str, str]) -> None:
    """Make the version's ``eval.*`` tags exactly this evaluation's (stale keys deleted), with its gates.

    A reused stage maps to the version registered when it was trained; promotion judges the version's tags,
    so they must be the evaluation of this run (new champion measured, new data contract), not the old one.
    """
    fresh = {k: v for k, v in tags.items() if k.startswith(EVAL_PREFIX)}
    current = client.get_model_version(name, str(version)).tags
    for key in current.keys() - fresh.keys():
        if key.startswith(EVAL_PREFIX):
            client.delete_model_version_tag(name, str(version), key)
    for key in (*fresh, "promote_gates", "contract_success", EVALUATED_IN):
        if current.get(key) != tags[key]:
            client.set_model_version_tag(name, str(version), key, tags[key])


def _describe(tags: dict[str, str]) -> str:
    shown = ", ".join(f"{k[len(EVAL_PREFIX) :]}={v}" for k, v in tags.items() if k.startswith(EVAL_PREFIX))
    return (
        f"flow run {tags['flow_run_id']}, dataset {tags['dataset_version']}, recipe hash {tags['recipe_hash']}, "
        f"git {tags['git_commit'][:10]}. Evaluation: {shown or 'none'}"
    )


def register_models(recipe, results: dict, eval_metrics: dict, dataset_dir: Path, flow_run_id: str) -> dict[str, int]:
    """Register every stage result as ``<recipe>-<stage>``; alias ``candidate`` on each; stage → version."""
    client = MlflowClient()
    lineage = dataset_lineage(dataset_dir)
    common = {
        "flow_run_id": str(flow_run_id),
        EVALUATED_IN: str(flow_run_id),
        "recipe_name": recipe.name,
        "recipe_hash": recipe.recipe_hash(),
        "git_commit": git_sha(),
        **lineage,
        "promote_gates": recipe.promote.model_dump_json(),
        **_metric_tags(eval_metrics),
    }
    # A reused stage may name a run of another tracking store: it is logged into this one first (under its
    # folder's lock, so before the store's: one order of the two locks everywhere).
    here = lambda s, r: stage_run_here(recipe, s, Path(r.model_dir).parent, r.run_id, dataset_dir)
    run_ids = {s: here(s, r) for s, r in results.items()}
    versions = {}
    with store_lock("register"):  # two runs of one stage content (concurrent, or a re-run): one version, not two
        for stage, result in results.items():
            name = registered_name(recipe.name, stage)
            version, new = register_stage(client, name, stage, Path(result.model_dir), run_ids[stage], dict(common))
            if new:
                fault_point("register.after_version")  # crash tests only (tasks/runtime/faults.py)
            else:  # a reused stage or a retried flow run: promotion must read this run's evaluation
                write_evaluation_tags(client, name, version, common)
            if ROLLED_BACK_TAG in client.get_model_version(name, str(version)).tags:  # reused stages, rolled back
                print(f"{name} version {version}: rolled back from champion before, not a candidate again")
            else:
                client.set_registered_model_alias(name, CANDIDATE, str(version))
                print(f"{name} version {version}: {'registered' if new else 'already registered'}; alias candidate")
            versions[stage] = version
    return versions


# ---------------------------------------------------------------- reading


def version_info(client: MlflowClient, name: str, version: int | str):
    """Version with its tags and aliases (``get_model_version`` fills aliases; search does not)."""
    return client.get_model_version(name, str(version))


def alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_metrics(mv) -> dict[str, float]:
    """The ``eval.*`` tags of a version as floats, plus ``contract_success`` and ``rolled_back`` (1.0 / 0.0)."""
    from tasks.registry.gates import ROLLED_BACK_METRIC

    out = {k[len(EVAL_PREFIX) :]: float(v) for k, v in mv.tags.items() if k.startswith(EVAL_PREFIX)}
    out[ROLLED_BACK_METRIC] = 1.0 if ROLLED_BACK_TAG in mv.tags else 0.0
    if "contract_success" in mv.tags:
        out["contract_success"] = 1.0 if mv.tags["contract_success"] == "true" else 0.0
    return out


def champion_history(client: MlflowClient, name: str) -> list[int]:
    tags = client.get_registered_model(name).tags
    return [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


# ---------------------------------------------------------------- champion moves and decisions


def set_champion(client: MlflowClient, name: str, version: int) -> list[int]:
    """Move ``champion`` to ``version`` and append it to the history; returns the new history."""
    history = champion_history(client, name) + [int(version)]
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, str(version), "promotion.champion_since", _now())
    return history


def rollback_champion(client: MlflowClient, name: str) -> tuple[int, int]:
    """Move ``champion`` back to the previous champion; returns (from_version, to_version)."""
    history = champion_history(client, name)
    current = alias_version(client, name, CHAMPION)
    if len(history) < 2 or current is None:
        raise ValueError(
            f"{name}: no previous champion to roll back to (champion history: {history}); promote a version first"
        )
    history.pop()
    previous = history[-1]
    client.set_registered_model_alias(name, CHAMPION, str(previous))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, str(current), ROLLED_BACK_TAG, _now())
    if alias_version(client, name, CANDIDATE) == current:  # else a bare `promote` would judge it again
        client.delete_registered_model_alias(name, CANDIDATE)
    return current, previous


def record_decision(client: MlflowClient, name: str, decision: dict) -> None:
    """Write the decision on the candidate version (tags) and, where it has a run, as a JSON artifact."""
    version = str(decision["version"])
    client.set_model_version_tag(name, version, "promotion.action", decision["action"])
    client.set_model_version_tag(name, version, "promotion.passed", str(decision["passed"]).lower())
    client.set_model_version_tag(name, version, "promotion.failed_gates", ",".join(decision["failed"]) or "none")
    gates = {g["name"]: {k: g[k] for k in ("metric", "value", "op", "threshold", "passed")} for g in decision["gates"]}
    client.set_model_version_tag(name, version, "promotion.gates", json.dumps(gates)[:4900])
    mv = client.get_model_version(name, version)
    verdict = (
        "PASSED, champion"
        if decision["action"] == "promote"
        else (
            f"REJECTED (failing: {', '.join(decision['failed'])})"
            if decision["action"] == "reject"
            else decision["action"]
        )
    )
    client.update_model_version(
        name, version, description=f"{mv.description or ''}\nPromotion {_now()}: {verdict}".strip()
    )
    run_id = mv.run_id
    if run_id:
        client.log_dict(run_id, decision, f"promotion/{name}-v{version}-{int(time.time())}.json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promote_version(name: str, version: int | None, config=None) -> dict:
    """Judge a version (default: alias ``candidate``) against the gates; move ``champion`` only if all pass.

    ``config`` is the recipe's ``promote`` section; without it, the gates the version was registered with
    (tag ``promote_gates``). Returns the decision record, also written to the version (tags + artifact).
    One decision at a time per store: two runs promoting one version would both see no champion and both move it.
    """
    with store_lock(f"promote {name}"):
        return _judge_and_move(name, version, config)


def _judge_and_move(name: str, version: int | None, config) -> dict:
    from schemas.eval_config import PromoteConfig
    from tasks.registry.gates import champion_reference, decide

    client = MlflowClient()
    version = version if version is not None else alias_version(client, name, CANDIDATE)
    if version is None:
        raise ValueError(
            f"{name}: no version given and no `candidate` alias (a rolled-back version loses it); register a new run"
            " or pass --version"
        )
    mv = version_info(client, name, version)
    if config is None:
        if "promote_gates" not in mv.tags:
            raise ValueError(f"{name} v{version}: no promote_gates tag; pass --recipe to name the gates")
        config = PromoteConfig.model_validate_json(mv.tags["promote_gates"])
    candidate = version_metrics(mv)
    champion_version = alias_version(client, name, CHAMPION)
    if champion_version == int(version):  # an unchanged re-run: nothing new to judge, history untouched
        return {
            "model": name,
            "version": int(version),
            "action": "keep",
            "passed": True,
            "failed": [],
            "champion_history": champion_history(client, name),
            "markdown": f"# `{name}` v{version} is already the champion: no decision needed",
        }
    champion, source = None, ""
    if champion_version is not None:
        cmv = version_info(client, name, champion_version)
        champion, source = champion_reference(
            candidate,
            champion_version,
            version_metrics(cmv),
            cmv.tags.get("dataset_version") == mv.tags.get("dataset_version"),
        )
    decision = decide(name, int(version), config, candidate, champion, champion_version, source)
    record = decision.to_dict()
    if decision.action == "promote":
        record["champion_history"] = set_champion(client, name, int(version))
    record_decision(client, name, record)
    record["markdown"] = decision.to_markdown()
    return record


def rollback(name: str) -> dict:
    client = MlflowClient()
    current, previous = rollback_champion(client, name)
    history = champion_history(client, name)
    markdown = (
        f"# Rollback of `{name}`: champion v{current} → v{previous}\n\n"
        f"Champion history now: {history} (v{current} tagged `{ROLLED_BACK_TAG}`: refused by the gates from now on,"
        " and no longer `candidate`)."
    )
    return {
        "model": name,
        "action": "rollback",
        "from_version": current,
        "version": previous,
        "champion_history": history,
        "markdown": markdown,
    }


def _register_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    # Safe to retry: registration is idempotent on (flow run id, stage).
    return task(
        register_models,
        name="register",
        retries=2,
        retry_delay_seconds=5,
        retry_condition_fn=retry_on_transient_io,  # a busy or unreachable store, never a bad request
        cache_policy=NO_CACHE,
    )


register_stage_task = _register_task()
