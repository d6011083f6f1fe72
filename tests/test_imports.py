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
import yaml

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "great_expectations")
# Runs the given Python statement, then prints which heavy modules it imported (last line of stdout).
PROBE = "import json, sys\n{body}\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"


def heavy_imports_of(body: str, env: dict | None = None, timeout: int = 300) -> list[str]:
    code = PROBE.format(body=body, heavy=HEAVY)
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
    assert heavy_imports_of("import flows.align, flows.ingest, flows.promote") == []


def _fast_recipe(tmp_path: Path) -> Path:
    """The tiny recipe with a few steps per stage and few prompts (as tests/test_promote.py's e2e run)."""
    data = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    data["name"] = "reuse"
    for stage, steps in (("sft", 1), ("reward", 1), ("dpo", 1), ("rl", 1)):
        data[stage]["args"].update(max_steps=steps, eval_strategy="no", save_strategy="no")
    data["cai"].update(limit=2, generation={**data["cai"]["generation"], "max_new_tokens": 8})
    data["evaluate"].update(max_prompts=2, max_pairs=4, max_new_tokens=2, bootstrap_samples=20)
    data["promote"] = {"gates": {"kl": {"metric": "kl_per_token", "op": "<=", "threshold": 1e9}}}
    path = tmp_path / "reuse.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_align_rerun_with_every_stage_reused_imports_no_heavy_library(tmp_path):
    """Second run of the same recipe on the same data: every stage and the evaluation come from their keyed
    outputs, registration and promotion are no-ops, and no heavy library is imported (fresh process)."""
    recipe = _fast_recipe(tmp_path)
    call = (
        f"from flows.align import align\n"
        f"r = align(recipe={str(recipe)!r}, output={str(tmp_path / 'data')!r}, runs={str(tmp_path / 'runs')!r})\n"
        f"assert all(r[s].reused for s in ('sft', 'cai', 'reward', 'dpo', 'rl')), r"
    )
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_HOME": str(tmp_path / "prefect")}
    first = (
        f"from flows.align import align\n"
        f"align(recipe={str(recipe)!r}, output={str(tmp_path / 'data')!r}, runs={str(tmp_path / 'runs')!r})"
    )
    assert "torch" in heavy_imports_of(first, env)  # the probe sees a real run's imports
    assert heavy_imports_of(call, env) == []
