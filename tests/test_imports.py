"""Heavy libraries (torch, transformers, TRL, PEFT, datasets, Great Expectations) load only for real work:
importing the flows, and an unchanged re-run where every stage is reused, must not import them (they cost
~5 s of a re-run that otherwise takes a few seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fast_recipes import PASSING_PROMOTE, SMALL_EVALUATE, fast_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "great_expectations")
# Runs the given Python statement, then prints which heavy modules it imported (last line of stdout).
PROBE = "import json, sys\n{body}\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"


def heavy_imports_of(body: str, env: dict | None = None, timeout: int = 300, modules=HEAVY) -> list[str]:
    code = PROBE.format(body=body, heavy=tuple(modules))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_flows_imports_no_heavy_library():
    imported = heavy_imports_of("import flows.align, flows.ingest, flows.promote", modules=(*HEAVY, "mlflow"))
    assert imported == []  # MLflow too (a second): only a stage, registration or promotion that works imports it


def _fast_recipe(tmp_path: Path) -> Path:
    """The tiny recipe with one step per stage (rl too) and few prompts (as tests/test_promote.py's e2e run)."""
    cai = {"cai": {"limit": 2, "generation": {"max_new_tokens": 8}}}
    steps = {"sft": 1, "reward": 1, "dpo": 1, "rl": 1}
    return fast_tiny_recipe(
        tmp_path / "reuse.yaml",
        steps,
        keep_rl=True,
        merge={"name": "reuse", **cai, **SMALL_EVALUATE},
        replace=PASSING_PROMOTE,
    )


@pytest.mark.slow
def test_align_rerun_unchanged_does_nothing_and_recheck_reuses_every_stage_without_heavy_imports(tmp_path):
    """Second run of the same recipe on the same data: the last run's receipt, with no MLflow either (nothing is
    consulted). With recheck: every stage and the evaluation come from their keyed outputs, registration and
    promotion are no-ops, and no heavy library is imported (fresh processes)."""
    recipe = _fast_recipe(tmp_path)
    where = f"recipe={str(recipe)!r}, output={str(tmp_path / 'data')!r}, runs={str(tmp_path / 'runs')!r}"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_HOME": str(tmp_path / "prefect")}
    assert "torch" in heavy_imports_of(f"from flows.align import align\nalign({where})", env)  # the probe sees it
    stages = "('sft', 'cai', 'reward', 'dpo', 'rl')"
    unchanged = (
        f"from flows.align import align\nr = align({where})\n"
        f"assert r['unchanged_since']['flow_run_id'] and all(r[s].reused for s in {stages}), r\n"
        f"assert r['promotion']['model'] == 'reuse-dpo', r"
    )
    assert heavy_imports_of(unchanged, env, modules=(*HEAVY, "mlflow")) == []
    recheck = (
        f"from flows.align import align\nr = align({where}, recheck=True)\n"
        f"assert 'unchanged_since' not in r and all(r[s].reused for s in {stages}), r"
    )
    assert heavy_imports_of(recheck, env) == []
