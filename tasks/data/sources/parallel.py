"""One job per worker process, each a fresh interpreter, watched for progress: how a large file is parsed in parts.

Why not ``multiprocessing`` with ``fork``: forking a process that runs threads (Prefect's event loop and
services, a background import) copies every lock another thread holds at that moment into the child, where
no thread will ever release it; one of thirteen 160k-row ingests hung that way, a worker blocked on a futex
(issue 13.0). ``subprocess`` forks and *execs* at once (nothing of this process runs in the child before
``exec``), so a worker starts with no inherited locks, threads or signal handlers (Prefect's SIGTERM handler
printed a ``TerminationSignal`` traceback from every forked worker a pool terminated). ``spawn``/``forkserver``
would also exec, but re-run the parent's ``__main__`` (``flows.ingest``: Prefect's import) in each worker.

A worker reports progress at least every ``PROGRESS_EVERY`` rows; one that sends nothing for ``stall_seconds``
(``ALIGN_INGEST_STALL_SECONDS``, default 300), or that dies, fails the read with a message naming its job,
and every worker is stopped. The jobs' results come back pickled over a socket; bulk data goes through
files the job writes (``tasks.data.sources.core`` spools Arrow batches).
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from tasks.data.sources.readers import SourceError

STALL_SECONDS_ENV = "ALIGN_INGEST_STALL_SECONDS"
# Generous: the watch is a safety net for a hang (which lasts forever), not a timer. Between two progress messages
# a worker spends ~1.3 s of CPU (4096 rows, and every 16k rows a flush that hashes them: ~1.2 s); on this project's
# 2-core machines under a load of 15-20 (other test suites, torch jobs) one such gap took over 60 s.
DEFAULT_STALL_SECONDS = 300.0
PROGRESS_EVERY = 4096  # rows between progress messages: ~0.1 s of parsing, nothing next to it in cost


class WorkerStalled(SourceError):
    """A worker sent nothing for longer than the stall bound."""


class WorkerFailed(SourceError):
    """A worker exited before sending its result (killed, out of memory, crashed)."""


class WorkerBug(RuntimeError):
    """A job raised something other than a ``SourceError``: a bug, reported with the worker's traceback."""


def stall_seconds() -> float:
    raw = os.environ.get(STALL_SECONDS_ENV)
    if raw is None:
        return DEFAULT_STALL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise SourceError(f"{STALL_SECONDS_ENV}={raw!r}: expected a number of seconds > 0")
    return value


@dataclass
class _Worker:
    label: str  # what the job reads, for messages ("hh.jsonl bytes 0-1,024 (source 'hh')")
    proc: subprocess.Popen
    conn: Connection
    stderr: object  # a temporary file: the worker's own output, shown only when it fails
    last_heard: float
    last_progress: object = None
    result: object = None
    done: bool = False

    def failure(self, what: str) -> str:
        self.stderr.seek(0)
        tail = [line.strip() for line in self.stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return f"{self.label}: {what}" + (f" (its last output: {tail[-1]})" if tail else "")


def run_jobs(
    target: str,
    jobs: Sequence[tuple],
    labels: Sequence[str],
    stall: float | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> list:
    """Run ``target`` (``"module:function"``) once per job, each in its own worker process; their results in
    job order. The function is called as ``function(*job, progress=callback)`` and must call
    ``progress(position)`` at least every ``stall`` seconds (``position``: shown if it stalls after it).
    ``meanwhile`` runs here once the workers are started."""
    stall = stall_seconds() if stall is None else stall
    workers: list[_Worker] = []
    try:
        for job, label in zip(jobs, labels, strict=True):
            workers.append(_start(target, job, label))
        if meanwhile is not None:
            meanwhile()
        _watch(workers, stall)
        return [w.result for w in workers]
    finally:
        for w in workers:
            _stop(w)


def _start(target: str, job: tuple, label: str) -> _Worker:
    from schemas.recipe import PROJECT_ROOT  # here, not at the top: a worker has no use for the recipe schema

    ours, theirs = socket.socketpair()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _stop)
    with theirs:
        proc = subprocess.Popen(
            # -P: the working directory is not put first on sys.path (one holding another `tasks` package
            # would shadow ours); PYTHONPATH names this checkout.
            [sys.executable, "-P", "-c", "from tasks.data.sources.parallel import worker_main; worker_main()"]
            + [str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    conn = Connection(ours.detach())
    worker = _Worker(label, proc, conn, stderr, time.monotonic())
    conn.send((target, job))
    return worker


def _watch(workers: list[_Worker], stall: float) -> None:
    """Receive every worker's messages until each has sent its result; raise on a stall or a failure."""
    while pending := [w for w in workers if not w.done]:
        timeout = min(w.last_heard for w in pending) + stall - time.monotonic()
        for conn in wait([w.conn for w in pending], timeout=max(0.01, min(timeout, 1.0))):
            _receive(next(w for w in pending if w.conn is conn))
        now = time.monotonic()  # checked after reading what arrived: messages queue while `meanwhile` runs
        for w in pending:
            if not w.done and now - w.last_heard > stall:
                at = f"; last progress at {w.last_progress}" if w.last_progress is not None else ", not even started"
                raise WorkerStalled(
                    w.failure(
                        f"worker pid {w.proc.pid} made no progress for {stall:g} s{at}; stopped "
                        f"(a machine that is only slow: raise {STALL_SECONDS_ENV})"
                    )
                )


def _receive(w: _Worker) -> None:
    try:
        kind, payload = w.conn.recv()
    except (EOFError, OSError):
        code = w.proc.wait()
        raise WorkerFailed(w.failure(f"worker pid {w.proc.pid} exited with code {code} before finishing")) from None
    w.last_heard = time.monotonic()
    if kind == "progress":
        w.last_progress = payload
    elif kind == "done":
        w.result, w.done = payload, True
    elif payload[1]:  # "error": the job raised; payload = (its message, the traceback for a bug else "")
        raise WorkerBug(f"{w.label}: worker pid {w.proc.pid}: {payload[0]}\n{payload[1]}")
    else:
        raise SourceError(f"{w.label}: {payload[0]}")


def _stop(w: _Worker) -> None:
    if w.proc.poll() is None and not w.done:
        w.proc.kill()
    try:
        w.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a worker still writing its result after "done": not worth waiting for
        w.proc.kill()
        w.proc.wait()
    w.conn.close()
    w.stderr.close()


def worker_main() -> None:
    """A worker process: receive ``(target, job)``, run it, send progress and then its result or its error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    conn = Connection(int(sys.argv[1]))
    target, job = conn.recv()
    module, name = target.split(":")
    function: Callable = getattr(importlib.import_module(module), name)
    try:
        result = function(*job, progress=lambda position: conn.send(("progress", position)))
    except Exception as e:
        # A SourceError is a fact about the input (one line); anything else is a bug: keep its traceback.
        details = "" if isinstance(e, SourceError) else traceback.format_exc()
        conn.send(("error", (f"{type(e).__name__}: {e}" if details else str(e), details)))
        _exit(conn, 1)
    conn.send(("done", result))
    _exit(conn, 0)


def _exit(conn: Connection, code: int) -> None:
    """End the worker now, as ``multiprocessing`` ends its children: what the job wrote is closed and its result
    sent, and the interpreter's teardown of pyarrow, numpy and pandas (~0.35 s, waited for by the parent
    in ``_stop``) has nothing left to do."""
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
