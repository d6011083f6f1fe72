"""A parallel read cannot hang (issue 13.0): its workers are exec'd, never forked from this multi-threaded
process, and a worker that stalls or dies fails the read within a bound, naming the source and byte range."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import tasks.data.sources.core as core
from schemas.data_config import SourceConfig
from tasks.data.sources import parallel, read_source
from tasks.data.sources.parallel import STALL_SECONDS_ENV, WorkerFailed, WorkerStalled


def _hh_file(tmp_path: Path, shared_data: Path, copies: int) -> SourceConfig:
    """The real hh-rlhf rows, repeated: ``copies`` x 300 rows (a worker parses its half for ~0.1 s per copy)."""
    text = (shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_text(encoding="utf-8")
    path = tmp_path / "hh.jsonl"
    path.write_text(text * copies, encoding="utf-8")
    return SourceConfig(name="hh", format="hh-rlhf", path=str(path))


@pytest.fixture
def two_workers(monkeypatch, tmp_path):
    monkeypatch.setattr(core, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(core.os, "cpu_count", lambda: 2)
    (tmp_path / "spool").mkdir()
    monkeypatch.setattr(core, "_spool_dir", lambda size: str(tmp_path / "spool"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_read_source_parallel_with_threads_running_forks_nothing(tmp_path, monkeypatch, shared_data, two_workers):
    cfg = _hh_file(tmp_path, shared_data, 2)
    serial_cfg = cfg.model_copy(update={"limit": 10**9})  # a limit reads in this process
    serial = read_source(serial_cfg)
    # What a flow run has going (Prefect's event loop and services): threads, one of them holding a lock.
    held, release = threading.Lock(), threading.Event()
    held.acquire()
    threads = [threading.Thread(target=release.wait, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()

    def forbidden(*args, **kwargs):
        raise AssertionError("os.fork() while other threads run: the child inherits their held locks")

    monkeypatch.setattr(os, "fork", forbidden)
    try:
        assert threading.active_count() > 1
        result = read_source(cfg)
    finally:
        release.set()
        held.release()
    assert len(core._parallel_ranges(cfg, Path(cfg.path))) == 2
    assert result.rows_read == serial.rows_read == 600
    assert result.accepted.equals(serial.accepted) and result.quarantine.equals(serial.quarantine)
    assert not list((tmp_path / "spool").iterdir())


def _signal_worker(monkeypatch, sig: int, when: str) -> list:
    """Send ``sig`` to the first worker: ``when`` "launched" (before it sends anything) or "started" (once it
    reports its first progress). Returns [(pid, label, monotonic time of the signal)]."""
    start, receive, hit = parallel._start, parallel._receive, []

    def signal_once(worker):
        if not hit:
            os.kill(worker.proc.pid, sig)
            hit.append((worker.proc.pid, worker.label, time.monotonic()))

    def start_then_signal(*args):
        worker = start(*args)
        if when == "launched":
            signal_once(worker)
        return worker

    def receive_then_signal(worker):
        receive(worker)
        if when == "started" and worker.last_progress is not None:
            signal_once(worker)

    monkeypatch.setattr(parallel, "_start", start_then_signal)
    monkeypatch.setattr(parallel, "_receive", receive_then_signal)
    return hit


def test_read_source_stalled_worker_fails_naming_source_and_range_within_bound(
    tmp_path, monkeypatch, shared_data, two_workers
):
    cfg = _hh_file(tmp_path, shared_data, 4)
    monkeypatch.setenv(STALL_SECONDS_ENV, "3")
    # The first worker is stopped as it launches, so it is the first over the bound whatever the machine's
    # load (the other one, launched after it, may take seconds to start on a busy machine).
    hit = _signal_worker(monkeypatch, signal.SIGSTOP, when="launched")
    with pytest.raises(WorkerStalled) as caught:
        read_source(cfg)
    detected = time.monotonic()
    pid, label, stopped = hit[0]
    message = str(caught.value)
    assert message.startswith(f"{label}: worker pid {pid} made no progress for 3 s"), message
    assert label.startswith(f"{cfg.path} bytes 0-") and label.endswith("(source 'hh')")
    assert 3.0 <= detected - stopped < 3.0 + 2.0, "detected within the bound (checked at least once a second)"
    assert not _alive(pid), "the stalled worker is stopped"
    assert not list((tmp_path / "spool").iterdir())


def test_read_source_killed_worker_fails_at_once_naming_its_range(tmp_path, monkeypatch, shared_data, two_workers):
    cfg = _hh_file(tmp_path, shared_data, 20)
    monkeypatch.setenv(STALL_SECONDS_ENV, "60")
    hit = _signal_worker(monkeypatch, signal.SIGKILL, when="started")  # mid-way: it parses ~3,000 rows
    with pytest.raises(WorkerFailed) as caught:
        read_source(cfg)
    pid, label, killed = hit[0]
    assert str(caught.value).startswith(f"{label}: worker pid {pid} exited with code -9 before finishing")
    assert time.monotonic() - killed < 5, "a dead worker is not waited for until the stall bound"


def test_stall_seconds_not_a_positive_number_names_the_variable(monkeypatch):
    monkeypatch.setenv(STALL_SECONDS_ENV, "soon")
    with pytest.raises(ValueError, match=rf"{STALL_SECONDS_ENV}='soon': expected a number of seconds > 0"):
        parallel.stall_seconds()


# Jobs for run_jobs below: each worker imports this module by name and calls one with its job and ``progress``.
JOBS = "tests.test_ingest_reliability"  # (pytest imports it as a top-level module; a worker, from the checkout)


def _job_answers(value, *, progress):
    progress("answering")
    return {"value": value, "pid": os.getpid()}


def _job_rejects_input(*, progress):
    from tasks.data.sources.readers import SourceError

    raise SourceError("line 7: not JSON")


def _job_has_a_bug(*, progress):
    return {}["missing"]


def test_run_jobs_results_in_job_order_and_workers_end_at_once():
    results = parallel.run_jobs(f"{JOBS}:_job_answers", [(1,), (2,)], ["first", "second"])
    assert [r["value"] for r in results] == [1, 2]
    assert len({r["pid"] for r in results}) == 2 and os.getpid() not in {r["pid"] for r in results}
    assert not any(_alive(r["pid"]) for r in results)  # every worker has ended and been reaped


def test_run_jobs_input_error_is_one_line_naming_the_job():
    with pytest.raises(parallel.SourceError) as caught:
        parallel.run_jobs(f"{JOBS}:_job_rejects_input", [()], ["hh.jsonl bytes 0-9"])
    assert str(caught.value) == "hh.jsonl bytes 0-9: line 7: not JSON"
    assert not isinstance(caught.value, parallel.WorkerBug)


def test_run_jobs_bug_keeps_the_workers_traceback():
    with pytest.raises(parallel.WorkerBug) as caught:
        parallel.run_jobs(f"{JOBS}:_job_has_a_bug", [()], ["part 1"])
    message = str(caught.value)
    assert message.startswith("part 1: worker pid ") and "KeyError: 'missing'" in message
    assert "_job_has_a_bug" in message  # the traceback names the function that raised
