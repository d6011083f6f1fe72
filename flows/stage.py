"""Prefect flow `stage`: one training stage on whatever host picked it up (deployment `stage/gpu`).

align starts it through tasks/dispatch.run_on_pool with the recipe as data, the dataset directory and
its content version, and the stage's other arguments encoded as JSON; it returns the encoded result
(persisted, so the orchestrator reads it). The work runs in a task tagged `gpu`, bounded by that tag's
concurrency limit (one per GPU by default); a crash is retried by Prefect and the stage resumes from
its last checkpoint.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.runtime.dispatch import GPU_TAG, STAGE_FUNCTIONS, run_request


@task(
    name="train-stage", tags=[GPU_TAG], retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE
)  # the stage's own content key (result.json under runs/) is the cache
def train_stage(stage: str, recipe: dict, dataset_dir: str, call: dict) -> dict:
    return run_request(stage, recipe, dataset_dir, call, pure=True)


@flow(name="stage", log_prints=True, persist_result=True)
def stage(stage: str, recipe: dict, dataset_dir: str, dataset_version: str, call: dict) -> dict:
    """Run one stage (sft, cai, reward, dpo) of a recipe on this host; returns its encoded result."""
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"stage: {stage!r} is not one of {sorted(STAGE_FUNCTIONS)}")
    print(f"stage {stage} · dataset {dataset_version} · recipe {recipe.get('name')}")
    result = train_stage(stage, recipe, dataset_dir, call)
    reused = result.get("fields", {}).get("reused")
    print(f"stage {stage} {'reused' if reused else 'done'}")
    return result
