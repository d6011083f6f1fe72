"""Recipe files the slow tests (and benchmarks.demo --fast) run: recipes/tiny.yaml with a few steps per stage.

    fast_tiny_recipe(tmp_path / "x.yaml", {"sft": 2, "reward": 2, "dpo": 2}, merge={...}, replace={...})

One builder, so a change to tiny.yaml's shape is followed in one place. File paths inside stay relative: they
resolve against the project root, where the commands run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from schemas.recipe import deep_merge

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
# A few prompts and pairs, two new tokens: an evaluation that runs every code path in seconds.
SMALL_EVALUATE = {"evaluate": {"max_prompts": 2, "max_pairs": 4, "max_new_tokens": 2, "bootstrap_samples": 20}}
# A gate every run passes (the tests are about orchestration, not the metrics): `promote` replaced whole.
PASSING_PROMOTE = {"promote": {"gates": {"kl": {"metric": "kl_per_token", "op": "<=", "threshold": 1e9}}}}


def fast_tiny_recipe(
    path: Path,
    steps: dict[str, int],
    *,
    save_steps: int | None = None,
    keep_rl: bool = False,
    merge: dict | None = None,
    replace: dict | None = None,
) -> Path:
    """tiny.yaml with each stage of ``steps`` at that many steps and no in-training evaluation (a checkpoint every
    ``save_steps``, else none), without its ``rl`` section unless ``keep_rl``; then ``merge`` deep-merged and
    ``replace``'s top-level sections put in whole. Written to ``path``, which is returned."""
    data = yaml.safe_load(TINY.read_text())
    if not keep_rl:
        data.pop("rl", None)
    save = {"save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    for stage, n in steps.items():
        data[stage]["args"].update(max_steps=n, eval_strategy="no", **save)
    data = deep_merge(data, merge or {})
    data.update(replace or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path
