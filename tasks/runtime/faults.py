"""Fault injection for the crash tests (tests/test_crash_and_concurrency.py): ``ALIGN_FAULT=<point>`` makes the
process SIGKILL itself the first time it reaches that point: no ``finally``, no atexit, no flush, as when the
OOM killer or a lost node ends a run. Unset (everywhere outside those tests) a point costs one environment lookup.

The points, each where a crash would leave the most half-done:
- ``ingest.before_publish``: the version is parsed, cleaned, checked and written to its temporary folder, and
  not yet renamed into place;
- ``<stage>.checkpoint`` (``sft``, ``reward``, ``dpo``, ``rl``): a training stage has just saved its first checkpoint;
- ``register.after_version``: the first stage's registry version exists, the next stages' do not.
"""

from __future__ import annotations

import os
import signal

ENV = "ALIGN_FAULT"


def fault_point(name: str) -> None:
    """Die here, at once, when ``ALIGN_FAULT`` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_callbacks(section: str) -> list:
    """A trainer callback for ``<section>.checkpoint`` when that point is asked for, else nothing."""
    if os.environ.get(ENV) != f"{section}.checkpoint":
        return []
    from transformers import TrainerCallback

    class _DieAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # called once the checkpoint folder is complete
            fault_point(f"{section}.checkpoint")

    return [_DieAfterSave()]
