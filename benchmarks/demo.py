"""Benchmark: the demo path end to end, and where its time goes.

    .venv/bin/python -m benchmarks.demo [--recipe recipes/tiny.yaml]

On a private state folder, free ports and empty data/runs folders (so the first run really trains):
services up (Prefect + MLflow servers, pools, deploy, workers), `align/full` once (cold), and again
unchanged (every stage reused). Prints JSON: wall times, the re-run ratio (goal ≤ 0.10), and the
Prefect overhead of the cold run = its wall time minus the time spent inside task runs (the work),
plus the service start-up. Stops what it started.
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


def timed_run(svc, recipe: str, params: dict) -> dict:
    from scripts.demo import follow, start_run

    t0 = time.perf_counter()
    run = start_run("align/full", {"recipe": recipe, **params})
    final = follow(run.id, poll=1.0, quiet_logs=True)
    wall = time.perf_counter() - t0
    return {"state": final.state.type.value, "wall_s": round(wall, 1), "task_s": round(task_seconds(run.id), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
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
    try:
        t0 = time.perf_counter()
        svc.up()
        up_s = time.perf_counter() - t0
        with svc.api():
            cold = timed_run(svc, args.recipe, params)
            warm = timed_run(svc, args.recipe, params)
        total = up_s + cold["wall_s"]
        overhead = up_s + cold["wall_s"] - cold["task_s"]
        print(
            json.dumps(
                {
                    "services_up_s": round(up_s, 1),
                    "cold_run": cold,
                    "unchanged_rerun": warm,
                    "demo_equivalent_s": round(total, 1),
                    "prefect_overhead_s": round(overhead, 1),
                    "prefect_overhead_share": round(overhead / total, 3),
                    "rerun_ratio": round(warm["wall_s"] / cold["wall_s"], 3),
                },
                indent=2,
            )
        )
    finally:
        svc.down()


if __name__ == "__main__":
    main()
