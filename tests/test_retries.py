"""The one retry policy (tasks/runtime/retries.py): I/O that may pass on a second try is retried, a deterministic
failure never is, for the dataset build and the registry writes alike."""

from __future__ import annotations

import errno

import httpx
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from prefect.states import Completed, Failed

from tasks.runtime.retries import is_transient_io_error, retry_on_transient_io


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


def _caused_by(outer: Exception, cause: Exception) -> Exception:
    try:
        raise outer from cause
    except type(outer) as e:
        return e


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError("read timed out"),
        requests.ConnectionError("name resolution failed"),
        requests.Timeout("read timeout"),
        httpx.ConnectError("connection refused"),
        _http_error(503),
        _http_error(429),
        MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE),  # its SQL store, sqlite busy
        OSError(errno.ESTALE, "stale file handle"),
        _caused_by(RuntimeError("download failed"), ConnectionResetError("reset")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_is_transient_io_error_retries_io_that_may_pass_next_time(exc):
    assert is_transient_io_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("uf.jsonl row 812: chosen is empty"),
        KeyError("sources"),
        TypeError("bad argument"),
        RuntimeError("a bug"),
        FileNotFoundError(errno.ENOENT, "no such file", "data/x.jsonl"),
        PermissionError(errno.EACCES, "denied"),
        _http_error(404),
        _http_error(401),
        MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST),
        MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE),
        MlflowException("unexpected", error_code=INTERNAL_ERROR),  # the SQL store's wrapper of any exception
        _caused_by(MlflowException("wrapped", error_code=INTERNAL_ERROR), KeyError("x")),
    ],
    ids=lambda e: f"{type(e).__name__}-{getattr(e, 'error_code', '')}",
)
def test_is_transient_io_error_never_retries_deterministic_failures(exc):
    assert not is_transient_io_error(exc)


def test_retry_on_transient_io_reads_the_failed_states_exception():
    assert retry_on_transient_io(None, None, Failed(data=ConnectionError("refused")))
    assert not retry_on_transient_io(None, None, Failed(data=KeyError("stage")))  # the registry retried this before
    assert not retry_on_transient_io(None, None, Completed(data=1))


def test_dataset_build_and_registry_writes_share_the_one_retry_policy():
    from tasks.data.dataset import build_dataset_task
    from tasks.registry.versions import register_stage_task

    assert build_dataset_task.retry_condition_fn is retry_on_transient_io
    assert register_stage_task.retry_condition_fn is retry_on_transient_io
