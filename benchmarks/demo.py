"""Benchmark: the demo path end to end, and where its time goes.

    .venv/bin/python -m benchmarks.demo [--recipe recipes/tiny.yaml] [--fast] [--repeats 3]

On a private state folder, free ports and empty data/runs folders (so the first run really trains):
services up (Prefect + MLflow servers, pools, deploy, workers), `align/full` once (cold), then ``--repeats`` times
(3) an unchanged re-run followed by a run of an empty flow (benchmarks/empty_flow.py) deployed to the same pool, run
the same way. Prints JSON: wall times, the re-run ratio, *our share of the unchanged re-run* = its wall time minus
the empty flow's run after it (median and each; goal ≤ 1 s: Prefect's own cost of a flow run is not ours to cut),
and the Prefect overhead of the cold run = its wall time minus the time spent inside task runs (the work), plus
the service start-up. Stops what it started.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_seconds(flow_run_id) -> float:
    """Seconds inside task runs of the run and of its child flow runs (ingest, stage/gpu)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]}))
        ids = [flow_run_id, *(c.id for c in children)]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))
    # Nested task runs (a task calling tasks) would double count: keep those without a task parent.
    return sum(t.total_run_time.total_seconds() for t in tasks if not t.task_inputs.get("__parents__"))


def timed_run(svc, recipe: str, params: dict, deployment: str = "align/full") -> dict:
    from scripts.demo import follow, start_run

    t0 = time.perf_counter()
    run = start_run(deployment, {"recipe": recipe, **params})
    final = follow(run.id, poll=1.0, quiet_logs=True)
    wall = time.perf_counter() - t0
    return {"state": final.state.type.value, "wall_s": round(wall, 1), "task_s": round(task_seconds(run.id), 1)}


def deploy_empty() -> str:
    """benchmarks/empty_flow.py:empty as deployment ``empty/bench`` on the `cpu` pool, run from this checkout as
    align/full is (prefect.yaml's pull step: the working directory)."""
    from prefect.client.orchestration import get_client

    from benchmarks.empty_flow import empty

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(empty.name)
        client.create_deployment(
            flow_id=flow_id,
            name="bench",
            entrypoint="benchmarks/empty_flow.py:empty",
            work_pool_name="cpu",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
            parameter_openapi_schema={},
        )
    return "empty/bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument(
        "--fast", action="store_true", help="the orchestration test's few-step copy of tiny.yaml (the re-run only)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="unchanged re-runs, each followed by an empty run")
    args = parser.parse_args()
    from scripts.services import Services

    state = Path(tempfile.mkdtemp(prefix="align-bench-"))
    svc = Services(
        state=state,
        prefect_port=free_port(),
        mlflow_port=free_port(),
        extra_env={"ALIGN_RUNS_DIR": str(state / "runs")},
    )
    params = {"output": str(state / "data"), "runs": str(state / "runs")}
    if args.fast:
        from tests.test_orchestration import make_fast_recipe  # tests/fast_recipes.py

        args.recipe = str(make_fast_recipe(state))
    try:
        t0 = time.perf_counter()
        svc.up()
        up_s = time.perf_counter() - t0
        with svc.api():
            cold = timed_run(svc, args.recipe, params)
            empty = deploy_empty()
            timed_run(svc, args.recipe, params, empty)  # the first run of a new flow: not counted
            reruns, empties = [], []
            for _ in range(args.repeats):  # interleaved, so a change of load hits both sides alike
                reruns.append(timed_run(svc, args.recipe, params))
                empties.append(timed_run(svc, args.recipe, params, empty))
        total = up_s + cold["wall_s"]
        overhead = up_s + cold["wall_s"] - cold["task_s"]
        shares = sorted(round(r["wall_s"] - e["wall_s"], 1) for r, e in zip(reruns, empties))
        print(
            json.dumps(
                {
                    "services_up_s": round(up_s, 1),
                    "cold_run": cold,
                    "unchanged_reruns_s": [r["wall_s"] for r in reruns],
                    "unchanged_rerun_task_s": [r["task_s"] for r in reruns],
                    "empty_flow_runs_s": [e["wall_s"] for e in empties],
                    "our_share_of_rerun_s": {"median": shares[len(shares) // 2], "each": shares},
                    "demo_equivalent_s": round(total, 1),
                    "prefect_overhead_s": round(overhead, 1),
                    "prefect_overhead_share": round(overhead / total, 3),
                    "rerun_ratio": round(reruns[0]["wall_s"] / cold["wall_s"], 3),
                },
                indent=2,
            )
        )
    finally:
        svc.down()


if __name__ == "__main__":
    main()
