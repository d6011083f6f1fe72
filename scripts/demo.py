"""`make demo`, after the services are up: run `align/full`, stream its progress, print where to look.

Progress comes from the Prefect API while the run goes: every task run (and `stage/gpu` child run)
as it starts and ends, and the flow runs' own log lines, so the terminal is never silent.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start_run(deployment: str, parameters: dict, job_variables: dict | None = None):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(d.id, parameters=parameters, job_variables=job_variables)


def follow(flow_run_id, poll: float = 1.5, quiet_logs: bool = False):
    """Print task-run transitions and log lines of the run (and its child runs) until it ends; its state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter
    from prefect.client.schemas.sorting import LogSort

    seen_logs: set = set()
    task_states: dict = {}
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]}))
            run_ids = [flow_run_id, *(c.id for c in children)]
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": run_ids}))
            for t in sorted(tasks, key=lambda t: t.expected_start_time or t.created):
                st = t.state.type.value if t.state else "PENDING"
                if task_states.get(t.id) != st:
                    task_states[t.id] = st
                    dur = f" in {t.total_run_time.total_seconds():.1f}s" if st in TERMINAL else ""
                    log(f"  task {t.name:<28s} {st.lower()}{dur}")
            if not quiet_logs:
                logs = client.read_logs(
                    log_filter=LogFilter(flow_run_id={"any_": run_ids}, level={"ge_": 20}),
                    sort=LogSort.TIMESTAMP_ASC,
                    limit=200,
                    offset=0,
                )
                for line in logs:
                    if line.id not in seen_logs:
                        seen_logs.add(line.id)
                        print(f"           {line.message.splitlines()[0][:160] if line.message else ''}", flush=True)
            state = run.state.type.value if run.state else "SCHEDULED"
            if state in TERMINAL:
                return run
            if state in ("SCHEDULED", "PENDING") and time.monotonic() - started > 120:
                log(f"still {state.lower()} after 2 min: is a worker running for the pool? (python -m scripts status)")
                started = time.monotonic()
            time.sleep(poll)


def run_tree(client, flow_run_id) -> list:
    """The run and its child flow runs (ingest, promote, stage/gpu subflows), ids."""
    from prefect.client.schemas.filters import FlowRunFilter

    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]}))
    return [flow_run_id, *(c.id for c in children)]


def artifacts(flow_run_id) -> dict:
    """key → artifact data of the latest keyed artifacts in the run and its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": run_tree(client, flow_run_id)}))
    return {a.key: a.data for a in sorted(found, key=lambda a: a.created) if a.key}


def data_docs_path(arts: dict) -> str | None:
    m = re.search(r"Data Docs: `([^`]+)`", str(arts.get("dataset-summary") or ""))
    return m.group(1) if m else None


SHOWN_METRICS = (
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "rm_accuracy",
    "dpo_accuracy",
    "kl_per_token",
    "len_ratio",
    "safety_refusal_rate",
)


def registry_summary(tracking_uri: str, recipe_name: str) -> list[str]:
    """Registered models of the recipe with their aliases; the evaluation of the champion (or candidate)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    lines, metrics = [], None
    for rm in sorted(client.search_registered_models(), key=lambda m: m.name):
        if not rm.name.startswith(f"{recipe_name}-"):
            continue
        full = client.get_registered_model(rm.name)
        aliases = full.aliases or {}
        lines.append(
            f"  {rm.name:<20s} {', '.join(f'{a} → v{v}' for a, v in sorted(aliases.items())) or 'no aliases'}"
        )
        version = aliases.get("champion")
        if version and metrics is None:
            tags = client.get_model_version(rm.name, str(version)).tags
            metrics = (rm.name, version, {k: tags[f"eval.{k}"] for k in SHOWN_METRICS if f"eval.{k}" in tags})
    if metrics:
        name, version, shown = metrics
        lines.append(f"\nFinal metrics of the champion {name} v{version} (held-out test split)")
        lines += [f"  {k:<20s} {v}" for k, v in shown.items()]
    return lines


def dataset_docs(result) -> str | None:
    folder = result.get("dataset") if isinstance(result, dict) else None
    return str(Path(folder) / "data_docs" / "index.html") if folder else None


def promotion_summary(result) -> list[str]:
    if not isinstance(result, dict):
        return []
    if result.get("retrain") == "skipped":
        return [f"  {result.get('reason')}"]
    p = result.get("promotion")
    if not isinstance(p, dict):
        return ["  (no promotion in this run)"]
    failed = ", ".join(p.get("failed") or []) or "none"
    since = result.get("unchanged_since")
    return [
        *(
            [f"  nothing changed since flow run {since['flow_run_name']} ({since['finished_at']}): its decision"]
            if since
            else []
        ),
        f"  {p.get('model')} v{p.get('version')}: {p.get('action')} "
        f"({'all gates passed' if p.get('passed') else 'failed gates: ' + failed}); "
        f"champion history {p.get('champion_history')}",
    ]


def run_demo(svc, recipe: str) -> int:
    from schemas.recipe import load_recipe

    name = load_recipe(recipe).name
    t0 = time.monotonic()
    run = start_run("align/full", {"recipe": recipe})
    log(f"align/full started: flow run {run.name} ({svc.ui_url}/runs/flow-run/{run.id})")
    final = follow(run.id)
    took = time.monotonic() - t0
    state = final.state.type.value
    log(f"align/full {state.lower()} in {took:.0f}s: {final.state.message or ''}")
    arts = artifacts(run.id)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # unpickling the result imports the stages
    try:
        result = final.state.result()
    except Exception as e:  # a failed run has no result; the state message says why
        result = None
        log(f"no flow result: {e}")
    docs = data_docs_path(arts) or dataset_docs(result)  # an unchanged re-run ingests nothing: the dataset's own
    print("\nWhere to look")
    print(f"  Prefect UI   {svc.ui_url}/runs/flow-run/{run.id}   (artifacts: data quality, stage metrics, promotion)")
    print(f"  MLflow UI    {svc.mlflow_url}/#/models")
    print(f"  Data Docs    {docs or '(no dataset-summary artifact in this run)'}")
    print(f"  Artifacts    {', '.join(sorted(arts)) or 'none'}")
    print(f"  Logs         {svc.logs}/   ·   stop everything: make down")
    print("\nPromotion decision")
    print("\n".join(promotion_summary(result)))
    print("\nRegistered models and aliases")
    print("\n".join(registry_summary(svc.tracking_uri, name) or ["  (none registered)"]))
    return 0 if state == "COMPLETED" else 1
