"""Scale-out path: a stage with num_processes > 1 runs under `accelerate launch` (2 CPU processes, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.eval_config import ComputeConfig
from tasks.runtime import dispatch

ROOT = Path(__file__).resolve().parents[1]


def test_plan_with_two_processes_uses_accelerate_for_trainer_stages_only():
    compute = ComputeConfig(num_processes=2)
    assert dispatch.plan("sft", compute, env={}).mode == "accelerate"
    assert dispatch.plan("dpo", compute, env={}).mode == "accelerate"
    assert dispatch.plan("cai", compute, env={}).mode == "in-process"
    assert dispatch.plan("sft", ComputeConfig(), env={}).mode == "in-process"


def test_plan_with_gpu_pool_dispatches_unless_already_dispatched():
    compute = ComputeConfig(gpu_pool="gpu")
    assert dispatch.plan("reward", compute, env={}) == dispatch.Plan("deployment", pool="gpu")
    assert dispatch.plan("reward", compute, env={"ALIGN_DISPATCHED": "1"}).mode == "in-process"
    assert dispatch.plan("reward", ComputeConfig(), env={"ALIGN_GPU_POOL": "gpu"}).mode == "deployment"
    assert dispatch.plan("reward", compute, env={"ALIGN_GPU_POOL": "none"}).mode == "in-process"


def test_unknown_accelerate_config_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"shipped: \['ddp', 'deepspeed-zero3', 'fsdp'"):
        dispatch.plan("sft", ComputeConfig(accelerate_config="zero9"), env={})


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_load_as_accelerate_cluster_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # what `accelerate launch --config_file` does
    assert cfg.num_processes >= 2 and cfg.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_accelerate_command_on_cpu_uses_torchrun_with_gloo():
    cmd, env = dispatch.accelerate_command(
        dispatch.Plan("accelerate", num_processes=2), ["--stage", "sft"], cuda=False
    )
    assert "--multi_gpu" in cmd and env["ACCELERATE_USE_CPU"] == "true"
    fsdp = dispatch.resolve_accelerate_config("fsdp")
    cmd, _ = dispatch.accelerate_command(
        dispatch.Plan("accelerate", num_processes=2, accelerate_config=fsdp), [], cuda=False
    )
    assert "--config_file" not in cmd and "--multi_gpu" in cmd  # FSDP needs GPUs: DDP/gloo on CPU
    cmd, _ = dispatch.accelerate_command(
        dispatch.Plan("accelerate", num_processes=8, accelerate_config=fsdp), [], cuda=True
    )
    assert cmd[cmd.index("--config_file") + 1] == fsdp and "--multi_gpu" not in cmd


def test_encode_decode_round_trips_stage_results_and_paths(tmp_path):
    from tasks.training.stage import StageResult

    r = StageResult("sft", tmp_path / "model", {"loss": 1.5}, "run1", reused=True)
    back = dispatch.decode(json.loads(json.dumps(dispatch.encode({"args": [r, tmp_path], "kwargs": {}}))))
    assert back["args"] == [r, tmp_path]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sft_under_accelerate_launch_trains_on_two_cpu_processes(tiny_recipe, tiny_dataset, tmp_path):
    """Two gloo ranks (DDP) act as one run: rank 0 alone locks, tracks and writes one whole folder, which holds
    the weights a single process reaches on the same global batch (2 ranks x 2 rows = 1 process x 2 rows x 2
    accumulation steps), and which a later in-process run reuses instead of retraining."""
    import time

    import mlflow

    t0 = int(time.time() * 1000)
    recipe = tiny_recipe.model_copy(deep=True)
    args = {**recipe.sft.args, "max_steps": 3, "eval_strategy": "no", "save_steps": 3, "learning_rate": 1e-2}
    recipe.compute = ComputeConfig(num_processes=2, accelerate_config="ddp")
    recipe.sft.args = {**args, "per_device_train_batch_size": 2}

    result = dispatch.dispatch_stage("sft", recipe, tiny_dataset, None, tmp_path)

    assert not result.reused and result.metrics["world_size"] == 2  # torch.distributed (gloo), 2 ranks
    assert result.metrics["global_step"] == 3
    folder = result.model_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not (folder / "training_args.bin").exists() and not (folder.parent / ".saved").exists()
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"attributes.start_time >= {t0} and tags.`align.stage` = 'sft'"
    )
    assert len(runs) == 1 and runs.iloc[0]["run_id"] == result.run_id  # rank 1 tracked nothing

    single = tiny_recipe.model_copy(deep=True)
    single.sft.args = {**args, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    alone = dispatch.dispatch_stage("sft", single, tiny_dataset, None, tmp_path)
    ddp, one = _weights(folder), _weights(alone.model_dir)
    start = _weights(dispatch.prepare_base("sft", single, tiny_dataset, (None, tmp_path), {})["base_model"])
    assert ddp.keys() == one.keys() and one.keys() <= start.keys()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    apart = max(float((ddp[k] - one[k]).abs().max()) for k in one)
    assert moved > 1e-3 and apart < moved / 100, (moved, apart)  # same training, up to float summation order

    # The same content key in one process: the folder trained under accelerate is reused, not retrained.
    recipe.compute = ComputeConfig()
    again = dispatch.dispatch_stage("sft", recipe, tiny_dataset, None, tmp_path)
    assert again.reused and again.model_dir == result.model_dir
