"""Prefect flow `promote`: move alias `champion` to a candidate only when every recipe gate passes.

    python -m flows.promote --model tiny-dpo [--version N] [--recipe recipes/tiny.yaml] [--rollback]

Without --version the `candidate` alias is judged; without --recipe the gates it was registered with.
The decision (each gate, value, threshold, pass) goes to the version's tags, a JSON artifact of its run,
and a Prefect markdown artifact. --rollback moves `champion` back to the previous champion and marks the
version it leaves (`promotion.rolled_back_at`): it loses `candidate` and the gates refuse it from then on, so a
re-run that reuses its stages cannot promote it again.

Loading the champion (each version is an MLflow model with the stage's HF folder at artifacts/hf; README):

    from transformers import AutoModelForCausalLM
    path = mlflow.artifacts.download_artifacts("models:/tiny-dpo@champion/artifacts/hf")
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import argparse
import json
import re

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from schemas.recipe import load_recipe
from tasks.registry import tracking


@flow(name="promote", log_prints=True)
def promote(model: str, version: int | None = None, rollback: bool = False, recipe: str | None = None) -> dict:
    """Judge `model` version (default: candidate) against the gates and move champion; or roll back."""
    from tasks.registry import versions as registry  # MLflow (a second): imported when there is a decision

    r = load_recipe(recipe) if recipe else None
    _use_tracking(r)
    record = (
        registry.rollback(model) if rollback else registry.promote_version(model, version, r.promote if r else None)
    )
    if FlowRunContext.get():  # absent when tests call promote.fn (no Prefect server needed)
        key = re.sub(r"[^a-z0-9-]+", "-", f"promotion-{model}".lower())
        create_markdown_artifact(record["markdown"], key=key, description=f"promotion decision for {model}")
    print(record["markdown"])
    return record


def _use_tracking(recipe) -> None:
    import mlflow

    if recipe is not None:
        tracking.setup(recipe)
    else:
        mlflow.set_tracking_uri(tracking.tracking_uri(None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=promote.__doc__)
    parser.add_argument("--model", required=True, help="registered model, e.g. tiny-dpo")
    parser.add_argument("--version", type=int, default=None, help="default: the `candidate` alias")
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="move champion back to the previous champion; the version left is never promoted again",
    )
    parser.add_argument("--recipe", default=None, help="gates from this recipe (default: the version's tag)")
    args = parser.parse_args(argv)
    from scripts.cli import run_command  # the command layer: checks, Prefect mode, one-line errors

    def work() -> None:
        record = promote(model=args.model, version=args.version, rollback=args.rollback, recipe=args.recipe)
        print(json.dumps({k: v for k, v in record.items() if k != "markdown"}, indent=1, default=str))

    run_command(lambda: args.recipe and load_recipe(args.recipe), work)  # a bad recipe: before Prefect starts


if __name__ == "__main__":
    main()
