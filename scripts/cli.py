"""What every command (`python -m flows.ingest|align|promote`, `python -m scripts`) does around its work.

- **Checks first**: the recipe and its sources are checked before Prefect starts, so a bad key or a
  missing file fails in a second, not after a temporary server's 5-17 s start.
- **One line per known fault**: an input or configuration problem (``ValueError`` and its subclasses:
  recipe, source, stage and registry errors; ``FileNotFoundError``; a broken data contract; a model or
  version the MLflow registry does not have) prints
  ``error: <file or key>: <what is wrong>`` and exits 1. Anything else is a bug and keeps its traceback.
  Prefect's own failure reports (a run logger's ERROR records, with the traceback, and a flow's
  "Finished in state Failed(...)") still reach the Prefect API and UI, but are held off the console while
  the command runs: dropped when it ends in a known fault (its one line says it), printed at the end
  otherwise (a bug, or a task that failed and was retried).
- **One mode line**: a Prefect server named by ``PREFECT_API_URL``, else the local one that
  ``python -m scripts up`` (``make up``) started when it runs (same state folder and port as
  ``scripts.services``), else a temporary one for this command only.
- **No telemetry**: the server's telemetry service (``PREFECT_SERVER_ANALYTICS_ENABLED``) is off; offline it
  logged ``ERROR | prefect.server.services.telemetry - Failed to send telemetry`` on every run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager

from scripts.services import Services, _healthy

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
FAILED_STATE = ("Finished in state Failed", "Finished in state Crashed")  # Prefect's report of a run's end


def run_command(check: Callable[[], object], work: Callable[[], object], prefect: bool = True) -> None:
    """``check()`` (validation only, before Prefect starts), then ``work()`` (with ``prefect``: under the
    Prefect mode, run loggers' errors held). A known fault of either ends the process with one ``error:``
    line and exit status 1."""
    try:
        check()
        if not prefect:
            work()
            return
        with prefect_mode(), _held_run_errors() as held:
            try:
                work()
            except BaseException as e:
                if is_known_fault(e):
                    held.clear()  # the error line below says it; the Prefect UI keeps the full report
                else:
                    held.drop_tracebacks()  # a bug: its messages, then its traceback once, as it propagates
                raise
    except Exception as e:
        if not is_known_fault(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def is_known_fault(e: BaseException) -> bool:
    if isinstance(e, (ValueError, FileNotFoundError)):
        return True
    # Classes of modules not imported cannot have raised: look them up, never import them here.
    contracts, mlflow_errors = sys.modules.get("tasks.data.contracts"), sys.modules.get("mlflow.exceptions")
    if contracts is not None and isinstance(e, contracts.ContractBreach):
        return True
    # A model or version name that is not in the registry (`flows.promote --model x --version 9`).
    return (
        mlflow_errors is not None
        and isinstance(e, mlflow_errors.MlflowException)
        and e.error_code == "RESOURCE_DOES_NOT_EXIST"
    )


def one_line(e: BaseException) -> str:
    """The message on one line: its first line, then the other non-empty lines after ``: `` / ``; ``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[0] + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "")


@contextmanager
def prefect_mode():
    """Point Prefect at the server this command should use, say which on stderr, and keep telemetry off."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    updates: dict = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    # A temporary server on a busy 2-core machine takes 20-40 s to answer: Prefect's default wait (20 s) failed
    # there with "Timed out while attempting to connect to ephemeral Prefect API server". Ours: 120 s, unless set.
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 120
    if os.environ.get("PREFECT_API_URL"):
        line = f"prefect: the server at {os.environ['PREFECT_API_URL']} (PREFECT_API_URL)"
    else:
        svc = Services()
        if svc.pid("prefect-server") and _healthy(f"{svc.api_url}/health"):
            updates[PREFECT_API_URL] = svc.api_url
            line = f"prefect: the local server {svc.ui_url} (started by `make up`; state {svc.state})"
        else:
            line = "prefect: no local server is running (`make up` starts one): a temporary server for this command"
    print(line, file=sys.stderr, flush=True)
    with temporary_settings(updates=updates):
        yield


class _HoldRunErrors(logging.Filter):
    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(RUN_LOGGERS) and (
            record.levelno >= logging.ERROR or record.getMessage().startswith(FAILED_STATE)  # a flow's: INFO
        ):
            self.held.append(record)
            return False
        return True

    def clear(self) -> None:
        self.held.clear()

    def drop_tracebacks(self) -> None:
        for record in self.held:
            record.exc_info, record.exc_text = None, None


@contextmanager
def _held_run_errors():
    """Prefect's console handler(s) hold back ERROR records of run loggers until the command ends; what is
    still held then (``clear()`` drops it) is printed."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    holder = _HoldRunErrors()
    for h in handlers:
        h.addFilter(holder)
    try:
        yield holder
    finally:
        for h in handlers:
            h.removeFilter(holder)
            for record in holder.held:
                h.handle(record)
