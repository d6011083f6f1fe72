"""Where a training stage runs: in this process, as a `stage/gpu` deployment run on a GPU work pool, or
through `accelerate launch` (several processes: DDP / FSDP / DeepSpeed).

    dispatch_stage("sft", recipe, dataset_dir, base_model, output_root)      # same arguments as sft_stage

The decision (``plan``) reads the recipe's ``compute`` section and two environment variables:
``ALIGN_GPU_POOL`` (names a pool; ``none`` forces in-process) and ``ALIGN_DISPATCHED`` (set inside a
dispatched stage, so it never dispatches again). Stage caching and resume are the stages' own (content
keys, ``result.json``, checkpoints under ``runs/``); dispatch only moves the call: the recipe as data
(paths already absolute), the dataset directory with its content version, and the stage's other
arguments (paths, earlier StageResults) encoded as JSON. A shared filesystem (or volume) is assumed.

Under `accelerate launch` every rank runs ``python -m tasks.runtime.dispatch --stage S --request R --result O``
(the trainer shards the batches across ranks) and rank 0 writes the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from schemas.recipe import PROJECT_ROOT
from tasks.registry.tracking import read_dataset_version

ACCELERATE_DIR = PROJECT_ROOT / "recipes" / "accelerate"
# stage → (Prefect task used in-process inside a flow, pure function used by accelerate ranks)
STAGE_FUNCTIONS = {
    "sft": ("tasks.training.sft:sft_stage", "tasks.training.sft:train_sft"),
    "cai": ("tasks.cai.stage:cai_stage", "tasks.cai.stage:cai_stage.fn"),
    "reward": ("tasks.training.reward:reward_stage", "tasks.training.reward:train_reward"),
    "dpo": ("tasks.training.dpo:dpo_stage", "tasks.training.dpo:train_dpo"),
    "rl": ("tasks.training.rl:rl_stage", "tasks.training.rl:train_rl"),
}
GPU_STAGES = frozenset(STAGE_FUNCTIONS)  # all of them want an accelerator when there is one
ACCELERATE_STAGES = frozenset({"sft", "reward", "dpo", "rl"})  # trainer stages; CAI generation: one process
STAGE_DEPLOYMENT = "stage/gpu"
GPU_TAG = "gpu"  # tag concurrency limit: stages per GPU host

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    mode: str  # "in-process" | "deployment" | "accelerate"
    pool: str | None = None
    num_processes: int = 1
    accelerate_config: str | None = None

    def describe(self) -> str:
        if self.mode == "deployment":
            return f"deployment {STAGE_DEPLOYMENT} on pool {self.pool!r}"
        if self.mode == "accelerate":
            cfg = f", config {Path(self.accelerate_config).name}" if self.accelerate_config else ""
            return f"accelerate launch, {self.num_processes} process(es){cfg}"
        return "in-process"


def plan(stage: str, compute, env: dict | None = None) -> Plan:
    """Decide where ``stage`` runs from the recipe's ``compute`` section and the environment."""
    env = os.environ if env is None else env
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; valid: {sorted(STAGE_FUNCTIONS)}")
    pool = env.get("ALIGN_GPU_POOL", compute.gpu_pool or "") or None
    if pool and pool.lower() == "none":
        pool = None
    if pool and stage in GPU_STAGES and not env.get("ALIGN_DISPATCHED"):
        return Plan("deployment", pool=pool)
    cfg = resolve_accelerate_config(compute.accelerate_config)
    if stage in ACCELERATE_STAGES and (compute.num_processes > 1 or cfg) and not env.get("ACCELERATE_LAUNCHED"):
        return Plan("accelerate", num_processes=compute.num_processes, accelerate_config=cfg)
    return Plan("in-process")


def resolve_accelerate_config(name: str | None) -> str | None:
    """``ddp`` / ``fsdp`` / ``deepspeed-zero2`` (shipped under recipes/accelerate/) or a path to a config file."""
    if not name:
        return None
    for candidate in (Path(name), ACCELERATE_DIR / name, ACCELERATE_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate.resolve())
    shipped = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    raise FileNotFoundError(
        f"compute.accelerate_config: {name!r} is neither a file nor a shipped config (shipped: {shipped})"
    )


def stage_function(stage: str, pure: bool = False):
    """The stage's Prefect task (in a flow run: shows in the UI) or its plain function (``pure``)."""
    from prefect.context import FlowRunContext

    ref = STAGE_FUNCTIONS[stage][1 if pure or FlowRunContext.get() is None else 0]
    module, attr = ref.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def dispatch_stage(stage: str, recipe, dataset_dir: str | Path, *args, **kwargs):
    """Run one stage where ``plan`` says: ``<stage>_stage(recipe, dataset_dir, *args, **kwargs)`` in this
    process, on the gpu pool, or under `accelerate launch`. Returns the stage's own result either way."""
    p = plan(stage, recipe.compute)
    log.info("stage %s: %s", stage, p.describe())
    if p.mode == "in-process":
        return stage_function(stage)(recipe, Path(dataset_dir), *args, **kwargs)
    if p.mode == "deployment":
        call = encode({"args": list(args), "kwargs": kwargs})
        return decode(run_on_pool(stage, recipe, dataset_dir, call, p.pool))
    kwargs = prepare_base(stage, recipe, dataset_dir, args, kwargs)
    return decode(run_accelerate(stage, recipe, dataset_dir, encode({"args": [], "kwargs": kwargs}), p))


def prepare_base(stage: str, recipe, dataset_dir, args: tuple, kwargs: dict) -> dict:
    """Resolve (and for `tiny`, build) the base model once, before the ranks start: N ranks building the
    same folder at once would race. The resolved path gives the same stage key as resolving it in-stage."""
    import inspect

    from tasks.training.stage import default_runs_root, resolve_base

    bound = inspect.signature(stage_function(stage, pure=True)).bind(recipe, Path(dataset_dir), *args, **kwargs)
    call = dict(bound.arguments)
    call.pop("recipe"), call.pop("dataset_dir")
    root = Path(call.get("output_root") or default_runs_root()) / recipe.name / read_dataset_version(dataset_dir)
    call["base_model"] = Path(resolve_base(recipe, stage, Path(dataset_dir), call.get("base_model"), root))
    return call


# ---- flow-level views of the stages (used by flows/align.py) ------------------------------------


def publish_stage_metrics(results: dict, plans: dict | None = None, note: str | None = None) -> str:
    """Prefect artifact `stage-metrics`: the stage table of tasks.training.stage, as markdown (``note`` above it)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.training.stage import format_stage_metrics, stage_metrics_rows

    text = format_stage_metrics(stage_metrics_rows(results, plans), markdown=True)
    text = f"{note}\n\n{text}" if note else text
    create_markdown_artifact(text, key="stage-metrics", description="stages of this align run: reused or trained")
    return text


def last_trained_on(recipe) -> tuple[str | None, str | None]:
    """(dataset version, "model@vN (alias)") of the champion of the recipe's promoted model, else of its
    latest registered version (a candidate that failed its gates was still trained on that data)."""
    from mlflow.tracking import MlflowClient

    from tasks.registry import tracking
    from tasks.registry.versions import CHAMPION, alias_version, registered_name

    client = MlflowClient(tracking_uri=tracking.tracking_uri(recipe))
    name = registered_name(recipe.name, recipe.promote.model)
    version, label = alias_version(client, name, CHAMPION), "champion"
    if version is None:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            return None, None
        version, label = max(int(v.version) for v in versions), "latest version"
    tags = client.get_model_version(name, str(version)).tags
    return tags.get("dataset_version"), f"{label} {name}@v{version}"


def retrain_decision(recipe, dataset_dir) -> tuple[bool, str]:
    """A scheduled retrain goes on only when the data changed since the last registered model was trained."""
    current = read_dataset_version(dataset_dir)
    trained_on, model = last_trained_on(recipe)
    if trained_on is None:
        return True, f"dataset {current}: no registered model yet, training"
    if trained_on == current:
        return False, f"dataset version {current} unchanged since {model}: nothing to retrain, nothing registered"
    return True, f"dataset {current} differs from {model}'s {trained_on}: retraining"


# ---- results across process boundaries -----------------------------------------------------------


def encode(obj):
    """Stage inputs/results → JSON: Paths and dataclasses (StageResult, CAIResult) keep their type."""
    if isinstance(obj, Path):
        return {"__path__": str(obj)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {
            "__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
        }
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def decode(obj):
    if isinstance(obj, dict):
        if "__path__" in obj:
            return Path(obj["__path__"])
        if "__dataclass__" in obj:
            module, name = obj["__dataclass__"].split(":")
            return getattr(importlib.import_module(module), name)(**decode(obj["fields"]))
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


# ---- gpu pool -------------------------------------------------------------------------------------


def run_on_pool(stage: str, recipe, dataset_dir, call: dict, pool: str) -> dict:
    """Start `stage/gpu` on ``pool`` as a child of the current flow run, wait, return its encoded result."""
    from prefect.deployments import run_deployment

    params = {
        "stage": stage,
        "recipe": recipe.model_dump(mode="json"),
        "dataset_dir": str(dataset_dir),
        "dataset_version": read_dataset_version(dataset_dir),
        "call": call,
    }
    flow_run = run_deployment(
        STAGE_DEPLOYMENT,
        parameters=params,
        timeout=None,
        poll_interval=2,
        job_variables={"env": {"ALIGN_DISPATCHED": "1"}},
        tags=[f"stage:{stage}"],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"stage {stage} on pool {pool!r}: flow run {flow_run.name} ended "
            f"{state.type.value if state else 'without a state'}: {state.message if state else ''}"
        )
    return state.result()


# ---- accelerate launch ----------------------------------------------------------------------------


def accelerate_command(p: Plan, stage_args: list[str], cuda: bool) -> tuple[list[str], dict]:
    """The `accelerate launch` command line and environment for ``p``.

    Without CUDA (tests, CPU hosts) the multi-GPU launcher (torchrun) is used with ACCELERATE_USE_CPU:
    that gives N real processes on gloo (``--cpu`` alone starts one process unless MPI is installed).
    FSDP / DeepSpeed configs need GPUs; on a CPU host their process count is kept and DDP/gloo is used.
    """
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(p.num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
    ]
    env = dict(os.environ, ACCELERATE_LAUNCHED="1", ALIGN_DISPATCHED="1", OMP_NUM_THREADS="1")
    kind = accelerate_kind(p.accelerate_config)
    use_config = bool(p.accelerate_config) and (cuda or kind == "MULTI_GPU")
    if use_config:
        cmd += ["--config_file", p.accelerate_config]
    elif p.accelerate_config:
        log.warning(
            "%s (%s) needs GPUs; on this CPU host the stage runs as %d DDP processes on gloo",
            Path(p.accelerate_config).name,
            kind,
            p.num_processes,
        )
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if p.num_processes > 1 and not use_config:
        cmd += ["--multi_gpu"]
    return cmd + ["-m", "tasks.runtime.dispatch", *stage_args], env


def accelerate_kind(config: str | None) -> str | None:
    """``distributed_type`` of an accelerate config file (MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    if not config:
        return None
    import yaml

    return (yaml.safe_load(Path(config).read_text()) or {}).get("distributed_type")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_accelerate(stage: str, recipe, dataset_dir, call: dict, p: Plan) -> dict:
    import torch

    with tempfile.TemporaryDirectory(prefix=f"align-{stage}-") as tmp:
        request, result_json = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(
            json.dumps({"recipe": recipe.model_dump(mode="json"), "dataset_dir": str(dataset_dir), "call": call})
        )
        stage_args = ["--stage", stage, "--request", str(request), "--result", str(result_json)]
        cmd, env = accelerate_command(p, stage_args, torch.cuda.is_available())
        log.info("stage %s: %s", stage, shlex.join(cmd))
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage}: accelerate launch exited {proc.returncode} ({shlex.join(cmd)})")
        if not result_json.is_file():
            raise RuntimeError(f"stage {stage}: accelerate launch finished but rank 0 wrote no {result_json.name}")
        return json.loads(result_json.read_text())


def run_request(stage: str, recipe: dict, dataset_dir: str, call: dict, pure: bool = True) -> dict:
    """Decode a dispatched call, run the stage here, return the encoded result."""
    from schemas.recipe import parse_recipe

    r = parse_recipe(recipe, f"<{stage} request>")
    c = decode(call)
    return encode(stage_function(stage, pure=pure)(r, Path(dataset_dir), *c["args"], **c["kwargs"]))


def main(argv: list[str] | None = None) -> None:
    """One rank under `accelerate launch`: every rank trains (the trainer shards batches), rank 0 writes the result."""
    parser = argparse.ArgumentParser(prog="python -m tasks.runtime.dispatch", description=main.__doc__)
    parser.add_argument("--stage", required=True, choices=sorted(STAGE_FUNCTIONS))
    parser.add_argument("--request", required=True, help="JSON: recipe (paths absolute), dataset_dir, call")
    parser.add_argument("--result", required=True, help="rank 0 writes the encoded stage result here")
    args = parser.parse_args(argv)
    req = json.loads(Path(args.request).read_text())
    rank = int(os.environ.get("RANK", "0"))
    result = run_request(args.stage, req["recipe"], req["dataset_dir"], req["call"])
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if isinstance(result.get("fields", {}).get("metrics"), dict):
        result["fields"]["metrics"]["world_size"] = world
    if rank == 0:
        out = Path(args.result)
        out.with_suffix(".tmp").write_text(json.dumps(result, indent=2))
        out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
