"""Prefect flow `ingest`: raw preference sources → validated, versioned Parquet splits.

python -m flows.ingest --recipe recipes/tiny.yaml [--output DIR]     # prints the version directory last
"""

from __future__ import annotations

import argparse

from prefect import flow

from schemas.recipe import load_recipe
from tasks.data.dataset import build_dataset_task, publish_dataset_report
from tasks.data.sources.core import check_sources


@flow(name="ingest", log_prints=True)
def ingest(recipe: str = "recipes/tiny.yaml", output: str | None = None) -> str:
    """Read every source of the recipe, clean, validate against the data contract, write a version."""
    r = load_recipe(recipe)
    dataset = build_dataset_task(r, output)
    publish_dataset_report(dataset)
    return str(dataset.path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.ingest", description=ingest.__doc__)
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--output", default=None, help="dataset root (default: the recipe's data.output_dir)")
    args = parser.parse_args(argv)
    from scripts.cli import run_command  # the command layer: checks, Prefect mode, one-line errors

    run_command(
        lambda: check_sources(load_recipe(args.recipe).sources),  # before Prefect starts: fails in a second
        lambda: print(ingest(recipe=args.recipe, output=args.output)),
    )


if __name__ == "__main__":
    main()
