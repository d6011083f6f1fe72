"""Orchestration for real: a Prefect server and a process worker on loopback (temporary PREFECT_HOME,
free port, temporary MLflow SQLite), deployments from prefect.yaml, `align/full` on a fast tiny recipe,
its cached re-run, a DPO-only change, the retrain schedule, and the Kubernetes gpu base job template."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts.services import Services
from tests.fast_recipes import fast_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]

K8S_TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-base-job-template.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def services(tmp_path_factory):
    state = tmp_path_factory.mktemp("align-state")
    svc = Services(
        state=state,
        prefect_port=free_port(),
        mlflow_port=free_port(),
        gpu_slots=1,
        extra_env={"ALIGN_RUNS_DIR": str(state / "runs"), "PREFECT_LOGGING_LEVEL": "INFO"},
    )
    try:
        svc.up(mlflow=False)  # the MLflow UI server is the demo's; runs log to SQLite
        yield svc
    finally:
        svc.down()  # workers first, then the server, by PID, even on failure


def make_fast_recipe(folder: Path) -> Path:
    """recipes/tiny.yaml with a few steps per stage, no rl (the RL stage's flow tests are tests/test_rl.py)."""
    # Orchestration is under test, not the metrics: a small CAI and evaluation (the scenario runs align/full 5x).
    small = {
        "cai": {"limit": 4},
        "evaluate": {"max_prompts": 4, "max_pairs": 8, "max_new_tokens": 8, "bootstrap_samples": 50},
    }
    return fast_tiny_recipe(folder / "tiny-fast.yaml", {"sft": 8, "reward": 8, "dpo": 6}, save_steps=4, merge=small)


def run_align(svc: Services, deployment: str, params: dict, job_variables: dict | None = None):
    from prefect.client.orchestration import get_client

    from scripts.demo import follow, start_run

    with svc.api():
        run = start_run(deployment, params, job_variables)
        follow(run.id, poll=2, quiet_logs=True)
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        return run, state


def check_first_run(services, fast_recipe):
    params = {"recipe": str(fast_recipe), "output": str(services.state / "data"), "runs": str(services.state / "runs")}
    run, state = run_align(services, "align/full", params)
    assert state.is_completed(), f"align/full ended {state.type}: {state.message}\n{_worker_log(services)}"
    return params, run, state


def _worker_log(svc: Services) -> str:
    f = svc.logs / "worker-cpu.log"
    return f.read_text(errors="replace")[-6000:] if f.is_file() else "(no worker log)"


STAGES = ("sft", "reward", "dpo")
SFT_GENERATOR = "sft_generator"  # the first SFT, when CAI's revisions trained a second one (flows/align.py)


def _results(svc: Services, state) -> dict:
    """The flow's return value (persisted by the worker), stage results only (with ``sft_generator`` when the
    tiny model's CAI accepted rows and supervised CAI ran SFT again)."""
    with svc.api():
        out = state.result()
    return {k: v for k, v in out.items() if k in STAGES or k == SFT_GENERATOR}


def check_align_full_deployment_completes_with_every_stage_trained(services, first_run):
    _, _, state = first_run
    results = _results(services, state)
    assert set(results) - {SFT_GENERATOR} == set(STAGES)
    assert all(not r.reused for r in results.values())
    assert all((Path(r.model_dir) / "config.json").is_file() for r in results.values())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=services.tracking_uri)  # the test's own SQLite store
    for stage in STAGES:
        assert client.get_model_version_by_alias(f"tiny-{stage}", "candidate").version


def check_align_full_rerun_reuses_every_stage(services, first_run):
    """The unchanged re-run is the first run's receipt: every stage reused, no subflow, no task, no new version."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    params, first, _ = first_run
    client = MlflowClient(tracking_uri=services.tracking_uri)
    versions = {s: client.get_model_version_by_alias(f"tiny-{s}", "candidate").version for s in STAGES}
    run, state = run_align(services, "align/full", params)
    assert state.is_completed(), state.message
    results = _results(services, state)
    assert [name for name, r in results.items() if not r.reused] == []
    with services.api(), get_client(sync_client=True) as prefect:
        since = state.result()["unchanged_since"]
        children = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [run.id]}))
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    assert since["flow_run_id"] == str(first.id) and children == [] and tasks == []
    # the same models: no new registry version, `candidate` where it was
    assert {s: client.get_model_version_by_alias(f"tiny-{s}", "candidate").version for s in versions} == versions


def check_retrain_deployment_is_scheduled_weekly_in_utc(services):
    from prefect.client.orchestration import get_client

    with services.api(), get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("align/retrain")
    assert d.parameters["retrain"] is True
    [sched] = d.schedules
    assert sched.active and sched.schedule.cron == "0 3 * * 1" and sched.schedule.timezone == "UTC"


def check_work_pools_and_gpu_tag_limit_exist(services):
    from prefect.client.orchestration import get_client

    with services.api(), get_client(sync_client=True) as client:
        assert {("cpu", "process"), ("gpu", "process")} <= {(p.name, p.type) for p in client.read_work_pools()}
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1


def check_k8s_gpu_base_job_template_is_accepted_by_work_pool_create(services, tmp_path):
    cmd = [
        str(Path(sys.executable).parent / "prefect"),
        "--no-prompt",
        "work-pool",
        "create",
        "gpu-k8s",
        "--type",
        "kubernetes",
        "--base-job-template",
        str(K8S_TEMPLATE),
    ]
    ok = subprocess.run(cmd, env=services.env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    from prefect.client.orchestration import get_client

    with services.api(), get_client(sync_client=True) as client:
        pool = client.read_work_pool("gpu-k8s")
    assert pool.type == "kubernetes" and pool.base_job_template == json.loads(K8S_TEMPLATE.read_text())

    # The same command rejects a template whose job refers to an undeclared variable: validation is real.
    broken = json.loads(K8S_TEMPLATE.read_text())
    del broken["variables"]["properties"]["gpu_count"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    bad = subprocess.run(
        [*cmd[:4], "gpu-k8s-broken", *cmd[5:-1], str(tmp_path / "broken.json")],
        env=services.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "gpu_count" in bad.stdout + bad.stderr


def test_k8s_template_renders_gpu_limits_node_selector_and_shared_volume():
    from prefect.utilities.templating import apply_values

    template = json.loads(K8S_TEMPLATE.read_text())
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    job = apply_values(template["job_configuration"], {**defaults, "gpu_count": 4})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "align-shared"
    assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    assert container["env"]["ALIGN_ROOT"] == container["workingDir"] == "/shared/align"


def check_worker_killed_during_sft_then_rerun_resumes_from_checkpoint(services, fast_recipe, tmp_path):
    from scripts.demo import start_run

    data = yaml.safe_load(fast_recipe.read_text())
    data["sft"]["args"].update(max_steps=16, save_steps=4, learning_rate=2.0e-3)  # new key: trains afresh
    recipe = tmp_path / "tiny-crash.yaml"
    recipe.write_text(yaml.safe_dump(data))
    params = {"recipe": str(recipe), "output": str(services.state / "data"), "runs": str(services.state / "runs")}
    runs = services.state / "runs"
    before = set(runs.glob("tiny/*/sft-*"))  # earlier tests' SFT folders keep their checkpoints
    with services.api():
        start_run("align/full", params)
    deadline = time.monotonic() + 300
    while not [
        c for c in runs.glob("tiny/*/sft-*/checkpoints/checkpoint-*/trainer_state.json") if c.parents[2] not in before
    ]:
        assert time.monotonic() < deadline, f"no SFT checkpoint appeared\n{_worker_log(services)}"
        time.sleep(0.5)
    services.stop("worker-cpu", crash=True)  # SIGKILL: the worker and its flow-run process die mid-SFT
    services.start_workers(("cpu",))

    _, state = run_align(services, "align/full", params)
    assert state.is_completed(), state.message
    results = _results(services, state)
    sft = results.get(SFT_GENERATOR, results["sft"])  # the first SFT (CAI's generator) is the one killed
    assert not sft.reused and sft.metrics["resumed_from_step"] >= 4 and sft.metrics["global_step"] == 16


def check_retrain_with_unchanged_data_ends_early_and_registers_nothing(services, first_run):
    from mlflow.tracking import MlflowClient

    params, _, _ = first_run
    client = MlflowClient(tracking_uri=services.tracking_uri)
    before = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}

    _, state = run_align(services, "align/retrain", {**params, "retrain": True})

    assert state.is_completed(), state.message
    with services.api():
        out = state.result()
    assert out["retrain"] == "skipped" and "unchanged since" in out["reason"] and "tiny-dpo@v" in out["reason"]
    after = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}
    assert after == before


def check_dpo_config_change_on_gpu_pool_reruns_only_dpo_each_stage_a_stage_run(
    services, first_run, fast_recipe, tmp_path
):
    """Two behaviours, one align run (test budget): with ALIGN_GPU_POOL every training stage is a `stage/gpu`
    child run on the gpu pool; after a change to dpo.args only DPO trains, the earlier stages are reused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    params, _, _ = first_run
    data = yaml.safe_load(fast_recipe.read_text())
    data["dpo"]["args"]["beta"] = 0.2
    changed = tmp_path / "tiny-fast-beta.yaml"
    changed.write_text(yaml.safe_dump(data))
    run, state = run_align(
        services, "align/full", {**params, "recipe": str(changed)}, job_variables={"env": {"ALIGN_GPU_POOL": "gpu"}}
    )

    assert state.is_completed(), f"{state.message}\n{_worker_log(services)}"
    results = _results(services, state)  # StageResults decoded from the stage runs' persisted results
    second_sft = SFT_GENERATOR in results  # supervised CAI: SFT ran again on the revisions
    expected = {"sft": True, "reward": True, "dpo": False} | ({SFT_GENERATOR: True} if second_sft else {})
    assert {n: r.reused for n, r in results.items()} == expected
    with services.api(), get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [run.id]}))
    gpu_runs = [c for c in children if c.work_pool_name == "gpu"]
    stages = sorted(["cai", "dpo", "reward", "sft"] + (["sft"] if second_sft else []))
    assert sorted(c.parameters["stage"] for c in gpu_runs) == stages
    assert all(c.state.is_completed() for c in gpu_runs)


@pytest.mark.slow
def test_prefect_server_scenario(services, tmp_path):
    """One server, one worker pair, in order (one xdist worker runs all of it; each step names itself)."""
    for sub in ("k8s", "dpo", "crash"):
        (tmp_path / sub).mkdir()
    fast_recipe = make_fast_recipe(tmp_path)
    check_retrain_deployment_is_scheduled_weekly_in_utc(services)
    check_work_pools_and_gpu_tag_limit_exist(services)
    check_k8s_gpu_base_job_template_is_accepted_by_work_pool_create(services, tmp_path / "k8s")
    first_run = check_first_run(services, fast_recipe)
    check_align_full_deployment_completes_with_every_stage_trained(services, first_run)
    check_align_full_rerun_reuses_every_stage(services, first_run)
    check_retrain_with_unchanged_data_ends_early_and_registers_nothing(services, first_run)
    check_dpo_config_change_on_gpu_pool_reruns_only_dpo_each_stage_a_stage_run(
        services, first_run, fast_recipe, tmp_path / "dpo"
    )
    check_worker_killed_during_sft_then_rerun_resumes_from_checkpoint(services, fast_recipe, tmp_path / "crash")
