"""Every command fails on a bad input in one line, `error: <file or key>: <what is wrong>`, exit status 1, no
traceback (issue 13.2); each fault through the real command in a subprocess, as a user runs it."""

from __future__ import annotations

import gzip
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH_DEMO = ROOT / "examples" / "data" / "hh-rlhf.jsonl"


def command_env(tmp_path: Path) -> dict:
    """The environment of a user at a shell: no test-only Prefect settings, a state folder of its own
    (so no local server of a `make up` elsewhere is found)."""
    env = {**os.environ, "ALIGN_STATE": str(tmp_path / "state"), "PREFECT_HOME": str(tmp_path / "prefect")}
    for key in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_API_URL", "PREFECT_LOGGING_LEVEL"):
        env.pop(key, None)
    return env


def run(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=command_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def recipe(tmp_path: Path, *sources: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: t\nsources:\n" + "".join(f"  - {s}\n" for s in sources) + f"data: {{output_dir: {tmp_path / 'data'}}}\n"
    )
    return str(path)


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1, output
    assert len(errors) == 1 and "Traceback" not in output and "| ERROR" not in output, output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


COMMANDS = {  # command → its arguments around a recipe
    "flows.ingest": lambda r: ["flows.ingest", "--recipe", r],
    "flows.align": lambda r: ["flows.align", "--recipe", r, "--stages", "sft"],
    "flows.promote": lambda r: ["flows.promote", "--model", "t-dpo", "--recipe", r],
    "scripts": lambda r: ["scripts", "demo", "--recipe", r],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_bad_recipe_key_prints_one_error_line_naming_file_and_key(tmp_path, command):
    r = recipe(tmp_path, f"{{name: a, format: hh-rlhf, path: {HH_DEMO}, lmit: 3}}")
    proc = run(tmp_path, *COMMANDS[command](r))
    assert_one_error_line(proc, f"error: {r}: ", "sources.0.lmit: unknown key")
    assert "temporary server" not in proc.stderr, "checked before Prefect starts"
    assert not (tmp_path / "state" / "pids").exists(), "no service started"


@pytest.mark.parametrize("command", ["flows.ingest", "flows.align", "scripts"])
def test_command_missing_source_file_prints_one_error_line_naming_it(tmp_path, command):
    r = recipe(tmp_path, f"{{name: demo/gone, format: hh-rlhf, path: {tmp_path / 'gone.jsonl'}}}")
    proc = run(tmp_path, *COMMANDS[command](r))
    assert_one_error_line(proc, "error: source 'demo/gone': file not found: ", str(tmp_path / "gone.jsonl"))
    assert "temporary server" not in proc.stderr and not (tmp_path / "data").exists()


def test_ingest_unknown_format_prints_one_error_line_listing_formats(tmp_path):
    r = recipe(tmp_path, f"{{name: a, format: hh_rlhf, path: {HH_DEMO}}}")
    assert_one_error_line(run(tmp_path, *COMMANDS["flows.ingest"](r)), f"{r}: ", "sources.0.format", "'hh-rlhf'")


def test_ingest_truncated_gzip_prints_one_error_line_and_publishes_nothing(tmp_path, shared_data):
    whole = gzip.compress((shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_bytes())
    cut = tmp_path / "hh.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    r = recipe(  # a good source first: read, then nothing of it may be published
        tmp_path,
        f"{{name: demo/hh-rlhf, format: hh-rlhf, path: {HH_DEMO}}}",
        f"{{name: cut, format: hh-rlhf, path: {cut}}}",
    )
    line = assert_one_error_line(
        run(tmp_path, *COMMANDS["flows.ingest"](r)), f"error: {cut}: truncated or corrupt gzip"
    )
    assert f"of {len(whole) // 2:,} compressed bytes" in line and " lines, " in line
    data = tmp_path / "data"
    # the data is read once the version is known (from the files' hashes), under the version's lock file
    left = [p for p in data.iterdir() if p.name != "failed" and not p.name.endswith(".lock")] if data.exists() else []
    assert not left, "no version, no temporary"


def test_run_command_known_fault_drops_prefects_report_a_bug_keeps_it(capfd, monkeypatch, tmp_path):
    """In process: what Prefect's run loggers report while the command works is held; a known fault's
    report is dropped (the error line says it), a bug's is printed and its exception propagates."""
    from prefect.logging.handlers import PrefectConsoleHandler

    from scripts.cli import run_command

    monkeypatch.setenv("ALIGN_STATE", str(tmp_path))
    shown = io.StringIO()  # what Prefect's console handler prints (pytest replaces the root's handlers)
    console = PrefectConsoleHandler(stream=shown)
    logging.getLogger().addHandler(console)
    monkeypatch.setattr(logging.getLogger("prefect.flow_runs"), "level", logging.INFO)

    def failing(error: Exception):
        def work():
            try:
                raise error
            except type(error):  # as Prefect's flow engine reports it: the message with the traceback
                logging.getLogger("prefect.flow_runs").exception("Encountered exception during execution: %r", error)
                raise

        return work

    try:
        with pytest.raises(SystemExit) as ended:
            run_command(lambda: None, failing(ValueError("rows.jsonl: broken")))
        err = capfd.readouterr().err
        assert ended.value.code == 1 and err.splitlines()[-1] == "error: rows.jsonl: broken"
        assert "Encountered exception" not in shown.getvalue()
        with pytest.raises(RuntimeError, match="a bug"):
            run_command(lambda: None, failing(RuntimeError("a bug")))
    finally:
        logging.getLogger().removeHandler(console)
    assert "Encountered exception during execution: RuntimeError('a bug')" in shown.getvalue()
    assert "Traceback" not in shown.getvalue(), "the bug's traceback is printed once, as it propagates"
    assert "error:" not in capfd.readouterr().err


def test_is_known_fault_registry_name_not_found_yes_other_mlflow_errors_no():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from scripts.cli import is_known_fault, one_line

    missing = MlflowException("Registered Model with name=tiny-dpo not found", error_code=RESOURCE_DOES_NOT_EXIST)
    assert is_known_fault(missing) and one_line(missing) == "Registered Model with name=tiny-dpo not found"
    assert not is_known_fault(MlflowException("database is locked", error_code=INTERNAL_ERROR))
    assert not is_known_fault(KeyError("table")), "a bug keeps its traceback"
