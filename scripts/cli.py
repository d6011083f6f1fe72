"""What every command (`python -m flows.ingest|align|promote`, `python -m scripts`) does around its work.

- **Checks first**: the recipe and its sources are checked before Prefect starts, so a bad key or a
  missing file fails in a second, not after a temporary server's 5-17 s start.
- **One line per known fault**: an input or configuration problem (``ValueError`` and its subclasses:
  recipe, source, stage and registry errors; ``FileNotFoundError``; a broken data contract) prints
  ``error: <file or key>: <what is wrong>`` and exits 1. Anything else is a bug and keeps its traceback.
  Prefect's own failure reports (a run logger's ERROR records, with the traceback, and a flow's
  "Finished in state Failed(...)") still reach the Prefect API and UI, but are held off the console while
  the command runs: dropped when it ends in a known fault (its one line says it), printed at the end
  otherwise (a bug, or a task that failed and was retried).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import contextmanager

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
FAILED_STATE = ("Finished in state Failed", "Finished in state Crashed")  # Prefect's report of a run's end


def run_command(check: Callable[[], object], work: Callable[[], object], prefect: bool = True) -> None:
    """``check()`` (validation only, before Prefect starts), then ``work()`` (with ``prefect``: run loggers'
    errors held). A known fault of either ends the process with one ``error:`` line and exit status 1."""
    try:
        check()
        if not prefect:
            work()
            return
        with _held_run_errors() as held:
            try:
                work()
            except BaseException as e:
                if is_known_fault(e):
                    held.clear()  # the error line below says it; the Prefect UI keeps the full report
                raise
    except Exception as e:
        if not is_known_fault(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def is_known_fault(e: BaseException) -> bool:
    if isinstance(e, (ValueError, FileNotFoundError)):
        return True
    from tasks.data.contracts import ContractBreach  # imported only on a failure

    return isinstance(e, ContractBreach)


def one_line(e: BaseException) -> str:
    """The message on one line: its first line, then the other non-empty lines after ``: `` / ``; ``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[0] + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "")


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
