"""One lock for work two runs must not do at once: building one dataset version, training one stage folder,
writing one tracking store's registry (two `align` runs of one recipe, a retried run beside the first).

``exclusive(path, what)`` holds an advisory ``flock`` on ``path``. The kernel drops it when its holder exits,
however it exits (kill -9 included), so a crashed run never leaves a stale lock behind. A run that finds the lock
taken says so on one line and waits; after the wait it re-checks what the other run finished (and reuses it)
instead of doing the work twice. Reentrant within a process (a thread re-entering its own lock does not wait on
itself). Works between processes of one host and on shared file systems with flock (NFS maps it to POSIX locks).
A place where no lock file can be created (a read-only folder of finished stages) is used without one: nothing
is written there either. Where two are held at once the order is always a stage folder's, then the tracking
store's (tasks/registry/tracking.store_lock), never the other way round, so two runs cannot wait on each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path

_guard = threading.Lock()
_held: dict[str, tuple[threading.RLock, list]] = {}  # path → (lock of this process's threads, [file, depth])


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    key = str(Path(path).resolve())
    with _guard:
        local, state = _held.setdefault(key, (threading.RLock(), [None, 0]))
    with local:
        if state[1] == 0:
            state[0] = _acquire(Path(key), what)
        state[1] += 1
        try:
            yield
        finally:
            state[1] -= 1
            if state[1] == 0 and state[0] is not None:
                state[0].close()  # closing the file releases the flock
                state[0] = None


def _acquire(path: Path, what: str):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 (held until the outermost exclusive() ends)
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{what}: another run holds {path}; waiting for it to finish", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def folder_lock(folder: Path, what: str):
    """The lock of one output folder (a stage's): ``<folder>/.lock``."""
    return exclusive(Path(folder) / ".lock", what)
