"""The one retry policy for the pipeline's Prefect tasks: retry I/O that may succeed on a second try (a network
or hub hiccup, a busy tracking store), never a deterministic failure (bad data, bad config, a missing file, a
bug): retrying those only repeats the failure after a delay.

Transient, judged on the exception and on the causes it was raised ``from``:
- the builtin ``ConnectionError`` (refused, reset, broken pipe) and ``TimeoutError`` (socket timeouts);
- transport errors of the HTTP clients in use (requests, httpx, urllib3): no response came back;
- an HTTP response with status 408, 425, 429, 500, 502, 503 or 504 (hub client errors carry their response);
- an MLflow error with code TEMPORARILY_UNAVAILABLE (e.g. a locked SQLite store), REQUEST_LIMIT_EXCEEDED,
  RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED. MLflow's INTERNAL_ERROR is not: its SQL store raises it for any
  unexpected exception (a bug), and its REST client has already retried 5xx responses before raising;
- an ``OSError`` whose errno says "try again" (EAGAIN, EBUSY, EINTR, ESTALE, ETIMEDOUT).
Everything else is permanent: ``ValueError``/``KeyError``/``TypeError``, ``FileNotFoundError`` and
``PermissionError``, an HTTP 4xx, an MLflow RESOURCE_DOES_NOT_EXIST or INVALID_PARAMETER_VALUE.
"""

from __future__ import annotations

import errno
import sys

TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_MLFLOW_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
)
TRANSIENT_ERRNO = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ESTALE, errno.ETIMEDOUT})
# (module, exception class) raised when no HTTP response came back; looked up only in modules already imported
# (an exception from a library that was never imported cannot have been raised).
_TRANSPORT_ERRORS = (
    ("requests.exceptions", "ConnectionError"),
    ("requests.exceptions", "Timeout"),
    ("httpx", "TransportError"),
    ("urllib3.exceptions", "ProtocolError"),
    ("urllib3.exceptions", "NewConnectionError"),
    ("urllib3.exceptions", "TimeoutError"),
)


def _loaded_type(module: str, name: str) -> type | None:
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _transport_error_types() -> tuple[type, ...]:
    return tuple(t for t in (_loaded_type(m, n) for m, n in _TRANSPORT_ERRORS) if t is not None)


def _http_status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _verdict(exc: BaseException) -> bool | None:
    """True / False when this exception alone decides; None to look at its cause."""
    if isinstance(exc, (ConnectionError, TimeoutError, *_transport_error_types())):
        return True
    status = _http_status(exc)
    if status is not None:
        return status in TRANSIENT_HTTP_STATUS
    mlflow_error = _loaded_type("mlflow.exceptions", "MlflowException")
    if mlflow_error is not None and isinstance(exc, mlflow_error):
        return True if exc.error_code in TRANSIENT_MLFLOW_CODES else None  # else its cause decides
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNO:
        return True
    return None


def is_transient_io_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised ``from``) is an I/O failure worth retrying."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        verdict = _verdict(exc)
        if verdict is not None:
            return verdict
        exc = exc.__cause__
    return False


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry the failed task run only when its exception is transient I/O."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the exception is the data the decision is made on
        return is_transient_io_error(exc)
    return False
