"""Crash and concurrency, for real (issue 13.5): commands killed with SIGKILL at deterministic points
(``ALIGN_FAULT``, tasks/runtime/faults.py) during ingest (parsed and written, not published), during SFT (after a
checkpoint) and during registration (after the first version); two ``align`` runs of one recipe at once; a
read-only tracking path. Nothing torn, nothing registered twice, every re-run finishes and says what it resumed.

State is temporary (data, runs, MLflow SQLite, Prefect home); the commands share one Prefect server on a free
loopback port. Every command runs in its own process group, killed when it ends (whatever it left running), and
the server is stopped by its group at the end."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.services import Services, _wait_healthy
from tasks.data.sources.readers import file_sha256
from tasks.runtime.faults import ENV as FAULT_ENV
from tests.fast_recipes import PASSING_PROMOTE, SMALL_EVALUATE, fast_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward", "dpo")
MODELS = {s: f"tiny-{s}" for s in STAGES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_recipe(folder: Path, name: str, **sft_args) -> Path:
    """recipes/tiny.yaml with 4 SFT steps (a checkpoint every 2), 2 reward and 2 DPO steps, a tiny evaluation
    and a gate that passes (file paths resolve against the project root: the commands run there)."""
    merge = {"sft": {"args": sft_args}, **SMALL_EVALUATE}
    steps = {"sft": 4, "reward": 2, "dpo": 2}
    return fast_tiny_recipe(
        folder / f"{name}.yaml", steps, save_steps=2, keep_rl=True, merge=merge, replace=PASSING_PROMOTE
    )


@dataclass
class World:
    state: Path
    env: dict
    recipe: Path

    @property
    def data(self) -> Path:
        return self.state / "data"

    @property
    def runs(self) -> Path:
        return self.state / "runs"

    def align_args(self, recipe: Path | None = None) -> list[str]:
        recipe = recipe or self.recipe
        return ["flows.align", "--recipe", str(recipe), "--stages", ",".join(STAGES), *self.outputs()]

    def outputs(self) -> list[str]:
        return ["--output", str(self.data), "--runs", str(self.runs)]


@dataclass
class Done:
    rc: int
    out: str
    err: str

    def tail(self) -> str:
        return f"rc {self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-4000:]}"


def start(world: World, args: list[str], fault: str | None, log: str, preexec=None) -> subprocess.Popen:
    """``python -m <args>`` from the project root in its own process group; output to files (a pipe nobody reads
    while the other command of a pair runs would fill and stall it)."""
    env = {**world.env, FAULT_ENV: fault} if fault else dict(world.env)
    with open(world.state / f"{log}.out", "w") as out, open(world.state / f"{log}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec,
        )


def finish(world: World, proc: subprocess.Popen, log: str, timeout: float = 600) -> Done:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the command left running (parse workers, ...)
        except ProcessLookupError:
            pass
        proc.wait()
    read = lambda suffix: (world.state / f"{log}{suffix}").read_text(errors="replace")
    return Done(rc, read(".out"), read(".err"))


def run(world: World, args: list[str], log: str, fault: str | None = None, preexec=None) -> Done:
    return finish(world, start(world, args, fault, log, preexec), log)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = tmp_path_factory.mktemp("crash-state")
    svc = Services(state=state / "services", prefect_port=free_port(), mlflow_port=free_port(), gpu_slots=1)
    env = {
        **svc.env(),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "PREFECT_LOGGING_LEVEL": "INFO",  # what a user sees: the flows' printed lines (ingest logs its prints)
        "HF_HOME": str(state / "hf"),
        "ALIGN_RUNS_DIR": str(state / "runs"),  # the evaluation's keyed results go there, not to ./runs (no --runs)
    }
    try:
        _, url, logfile = svc.start_prefect()
        _wait_healthy(url, 300, logfile)
        yield World(state, env, fast_recipe(state, "tiny-fast"))
    finally:
        svc.stop("prefect-server")


# ------------------------------------------------------------------------------------------ what is on disk


def published_versions(world: World) -> list[Path]:
    return sorted(p for p in world.data.iterdir() if p.is_dir() and not p.name.startswith((".", "failed")))


def check_version_complete(version_dir: Path) -> None:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["version"] == version_dir.name
    for name, meta in manifest["files"].items():
        assert file_sha256(version_dir / name) == meta["sha256"], f"{version_dir / name} differs from its manifest"


def stage_dirs(world: World, version: str) -> dict[str, list[Path]]:
    root = world.runs / "tiny" / version
    return {s: sorted(p for p in root.glob(f"{s}-*") if p.is_dir()) for s in STAGES}


def check_stage_finished(stage_dir: Path) -> dict:
    result = json.loads((stage_dir / "result.json").read_text())  # complete JSON, never half a file
    assert (stage_dir / "model" / "config.json").is_file() and (stage_dir / "model" / "model.safetensors").is_file()
    assert not list(stage_dir.glob(".tmp-*")) and not (stage_dir / "result.json.tmp").exists()
    return result


def statuses(out: str) -> dict[str, str]:
    """The stage-metrics table a run prints last: stage → trained | reused."""
    found = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) > 2 and cells[0] in STAGES and cells[1] in ("trained", "reused"):
            found[cells[0]] = cells[1]
    return found


def registry(world: World) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=world.env["MLFLOW_TRACKING_URI"])
    return {s: client.search_model_versions(f"name = '{name}'") for s, name in MODELS.items()}


def alias(world: World, stage: str, name: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=world.env["MLFLOW_TRACKING_URI"])
    return int(client.get_model_version_by_alias(MODELS[stage], name).version)


def champion_history(world: World) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=world.env["MLFLOW_TRACKING_URI"])
    return json.loads(client.get_registered_model(MODELS["dpo"]).tags.get("champion_history", "[]"))


# ------------------------------------------------------------------------------------------ the scenarios


def check_ingest_killed_before_publishing_leaves_no_version(world: World) -> Path:
    done = run(
        world,
        ["flows.ingest", "--recipe", str(world.recipe), "--output", str(world.data)],
        "ingest-killed",
        fault="ingest.before_publish",
    )
    assert done.rc == -signal.SIGKILL, done.tail()
    assert published_versions(world) == []  # nothing a reader or a later run could take for a version
    [partial] = list(world.data.glob(".tmp-*"))  # the whole build was done: it died at the rename
    assert (partial / "manifest.json").is_file() and (partial / "train.parquet").is_file()
    return partial


def check_two_align_runs_at_once_both_finish_each_stage_trained_and_registered_once(world: World, partial: Path):
    procs = [start(world, world.align_args(), None, f"pair-{i}") for i in (1, 2)]
    pair = [finish(world, p, f"pair-{i}") for i, p in zip((1, 2), procs)]
    for done in pair:
        assert done.rc == 0, done.tail()
    # The interrupted ingest's build is removed by the one run that builds the version, which says so.
    removed = f"ingest: removed {partial}, the unpublished build of an interrupted run"
    said = [d for d in pair if removed in d.out + d.err]  # the ingest flow logs its prints (to stderr)
    assert len(said) == 1, [d.tail() for d in pair]
    assert not list(world.data.glob(".tmp-*"))
    [version] = published_versions(world)
    check_version_complete(version)
    # One folder per stage, trained by one run; the other waited for it and reused it.
    dirs = stage_dirs(world, version.name)
    assert {s: len(d) for s, d in dirs.items()} == {s: 1 for s in STAGES}, dirs
    results = {s: check_stage_finished(d[0]) for s, d in dirs.items()}
    tables = [statuses(d.out) for d in pair]
    assert all(set(t) == set(STAGES) for t in tables), [d.out[-2000:] for d in pair]
    assert {s: sorted(t[s] for t in tables) for s in STAGES} == {s: ["reused", "trained"] for s in STAGES}
    # One registry version per stage content, from the stage's own run; `champion` moved once.
    versions = registry(world)
    assert {s: [(int(v.version), v.run_id) for v in vs] for s, vs in versions.items()} == {
        s: [(1, results[s]["run_id"])] for s in STAGES
    }
    assert all(alias(world, s, "candidate") == 1 for s in STAGES)
    assert champion_history(world) == [1]
    return version


def check_align_killed_during_sft_keeps_its_checkpoint_and_registers_nothing(world: World, recipe: Path, version):
    before = {s: len(d) for s, d in stage_dirs(world, version.name).items()}
    done = run(world, world.align_args(recipe), "sft-killed", fault="sft.checkpoint")
    assert done.rc == -signal.SIGKILL, done.tail()
    [sft] = [d for d in stage_dirs(world, version.name)["sft"] if not (d / "result.json").exists()]
    assert sorted(p.name for p in (sft / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert not (sft / "model").exists()
    assert {s: len(d) for s, d in stage_dirs(world, version.name).items()} == {**before, "sft": 2}
    assert {s: len(v) for s, v in registry(world).items()} == {s: 1 for s in STAGES}
    assert published_versions(world) == [version]  # the same data: the version is reused, not rebuilt
    return sft


def check_rerun_resumes_sft_then_dies_registering_with_one_new_version(world: World, recipe: Path, sft: Path):
    done = run(world, world.align_args(recipe), "register-killed", fault="register.after_version")
    assert done.rc == -signal.SIGKILL, done.tail()
    assert f"sft: resuming from {sft / 'checkpoints' / 'checkpoint-2'} (step 2 of 4)" in done.out, done.tail()
    result = check_stage_finished(sft)
    assert result["metrics"]["resumed_from_step"] == 2 and result["metrics"]["global_step"] == 4
    # Killed right after the first version was created: tiny-sft v2 exists, `candidate` has not moved yet.
    assert {s: len(v) for s, v in registry(world).items()} == {"sft": 2, "reward": 1, "dpo": 1}
    assert alias(world, "sft", "candidate") == 1


def check_rerun_after_registration_crash_registers_the_rest_once(world: World, recipe: Path, version):
    done = run(world, world.align_args(recipe), "rerun")
    assert done.rc == 0, done.tail()
    assert statuses(done.out) == {s: "reused" for s in STAGES}
    for line in (
        "tiny-sft version 2: already registered",
        "tiny-reward version 2: registered",
        "tiny-dpo version 2: registered",
    ):
        assert line in done.out, done.tail()
    versions = registry(world)
    assert {s: len(v) for s, v in versions.items()} == {s: 2 for s in STAGES}
    dirs = stage_dirs(world, version.name)
    assert {s: len(d) for s, d in dirs.items()} == {s: 2 for s in STAGES}
    for s in STAGES:
        runs = {check_stage_finished(d)["run_id"] for d in dirs[s]}
        assert {v.run_id for v in versions[s]} == runs  # one version per trained stage folder, none twice
        assert alias(world, s, "candidate") == 2


@pytest.mark.slow
def test_crashed_and_concurrent_runs_leave_nothing_torn_and_register_each_stage_once(world, tmp_path):
    partial = check_ingest_killed_before_publishing_leaves_no_version(world)
    version = check_two_align_runs_at_once_both_finish_each_stage_trained_and_registered_once(world, partial)
    changed = fast_recipe(tmp_path, "tiny-lr", learning_rate=2.0e-3)  # new SFT key (and so reward and DPO keys)
    sft = check_align_killed_during_sft_keeps_its_checkpoint_and_registers_nothing(world, changed, version)
    check_rerun_resumes_sft_then_dies_registering_with_one_new_version(world, changed, sft)
    check_rerun_after_registration_crash_registers_the_rest_once(world, changed, version)


# ------------------------------------------------------------------------------------------ read-only store


def _without_root_file_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so a
    process run as root (as on our machines) meets file modes like anyone else (its exec'd program gets no
    capability outside that set)."""
    if os.geteuid() != 0:  # file modes apply already (and dropping a capability needs CAP_SETPCAP)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_tracking_path_fails_in_one_line_naming_it_before_any_work(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    world = World(
        tmp_path,
        {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
            "PREFECT_HOME": str(tmp_path / "prefect"),
        },
        fast_recipe(tmp_path, "tiny-ro"),
    )
    store.chmod(0o555)
    try:
        done = run(world, world.align_args(), "read-only", preexec=_without_root_file_override)
    finally:
        store.chmod(0o755)
    assert done.rc == 1, done.tail()
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert lines == [
        f"error: {store}: the MLflow tracking store is not writable (Permission denied); "
        "point MLFLOW_TRACKING_URI at a writable location"
    ], done.tail()
    assert "Traceback" not in done.out + done.err
    # Checked before anything ran (no Prefect mode line: no temporary server), no data, no stage folder, nothing
    # in the store.
    assert not world.data.exists() and not world.runs.exists() and list(store.iterdir()) == []
