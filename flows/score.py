"""Prefect flow `score`: score a file with a registered reward model (any version or alias).

    python -m flows.score --model models:/tiny-reward@candidate --input examples/data/hh-rlhf.jsonl \\
        [--format auto|conversations|hh-rlhf|orca_dpo_pairs|ultrafeedback|ultrafeedback_binarized|generic] \\
        [--output scores.parquet] [--batch-size 16] [--experiment align-score] [--limit N]

JSON Lines of conversations get a `score` column; a preference file (read by the data plane's adapters) gets
`reward_chosen`, `reward_rejected`, `reward_margin` and its pairwise accuracy. The rows with their scores go
to Parquet (default `<input stem>.scores.parquet` here); a score histogram (PNG), the summary (metrics and
JSON) go to an MLflow run of experiment `align-score`, and a markdown summary to a Prefect artifact.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from tasks.registry import tracking

FORMATS = ["auto", "conversations", "hh-rlhf", "orca_dpo_pairs", "ultrafeedback", "ultrafeedback_binarized", "generic"]


@flow(name="score", log_prints=True)
def score(
    model: str,
    input_file: str,
    output: str | None = None,
    input_format: str = "auto",
    batch_size: int = 16,
    experiment: str = "align-score",
    limit: int | None = None,
) -> dict:
    """Score `input_file` with the reward model `model` (a models:/ or runs:/ URI); the summary."""
    from tasks.serving.scoring import score_file

    if input_format not in FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; valid: {', '.join(FORMATS)}")
    tracking.use_experiment(experiment)
    result = score_file(model, Path(input_file), Path(output) if output else None, input_format, batch_size, limit)
    if FlowRunContext.get():  # absent when tests call score.fn (no Prefect server needed)
        name = result["model"].get("model_name", "model")
        key = re.sub(r"[^a-z0-9-]+", "-", f"scores-{name}".lower())
        create_markdown_artifact(result["markdown"], key=key, description=f"scores of {input_file} by {model}")
    print(result["markdown"])
    return result


def check_model(model: str) -> None:
    """The model URI names something in the tracking store (a missing name, version or alias is one line)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.serving.scoring import resolve_model

    mlflow.set_tracking_uri(tracking.tracking_uri(None))
    try:
        resolve_model(model)
    except MlflowException as e:
        raise ValueError(f"--model {model}: {e.message}") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m flows.score", description=score.__doc__)
    parser.add_argument("--model", required=True, help="e.g. models:/tiny-reward@candidate, models:/tiny-reward/3")
    parser.add_argument("--input", required=True, help="JSON Lines of conversations, or a preference file")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: detected)")
    parser.add_argument("--output", default=None, help="Parquet file (default: <input stem>.scores.parquet here)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--experiment", default="align-score", help="MLflow experiment of the scoring run")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows of the file")
    args = parser.parse_args(argv)
    from scripts.cli import run_command  # the command layer: checks, Prefect mode, one-line errors

    def check() -> None:  # a missing file or model fails in one line before Prefect starts
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"--input {args.input}: no such file")
        check_model(args.model)

    done: dict = {}

    def work() -> None:
        done.update(
            score(
                model=args.model,
                input_file=args.input,
                output=args.output,
                input_format=args.format,
                batch_size=args.batch_size,
                experiment=args.experiment,
                limit=args.limit,
            )
        )
        print(json.dumps({k: v for k, v in done.items() if k != "markdown"}, indent=1, default=str))

    run_command(check, work)
    return done


if __name__ == "__main__":
    main()
