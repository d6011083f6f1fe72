"""Importing slow modules in the background, while the process waits on something else.

Great Expectations takes 2-3 s to import and is needed only at the contract step; while worker processes
parse a large source, the parent process sits idle, so ``build_dataset`` imports it then.

While such an import runs, no other thread may import (two threads importing a package with circular
imports, as Great Expectations and pandas have, can get a partially initialised module): ``read_source``
calls :func:`wait_for_background_imports` as soon as its workers are done. Forking is no concern here:
nothing in the data plane forks this process (``tasks.data.sources.parallel`` execs its workers).
"""

from __future__ import annotations

import importlib
import threading

_threads: list[threading.Thread] = []


def import_in_background(*modules: str) -> None:
    """Start importing ``modules`` in a daemon thread; call :func:`wait_for_background_imports` before
    this thread imports again. An import error is raised again by the caller's own import."""

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # re-raised by the caller's own import, with its normal traceback
                return

    thread = threading.Thread(target=run, name="background-import", daemon=True)
    thread.start()
    _threads.append(thread)


def wait_for_background_imports() -> None:
    """Block until every background import has finished (call before this thread imports again)."""
    while _threads:
        _threads.pop().join()
