"""Per-step trainer metrics into the active MLflow run (see tasks/tracking.py for the run layout).

A module of its own because subclassing transformers' ``TrainerCallback`` imports transformers and torch
(~4 s): tasks/training.py imports it only when a stage really trains, so a reused stage never pays it.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from tasks.registry.tracking import metric_name


class MlflowMetricsCallback(TrainerCallback):
    """Per-step trainer logs (loss, rewards, margins, accuracies, eval_*) into the active MLflow run.

    Kept off the training loop: ``on_log`` only buffers; every ``flush_s`` seconds the buffer goes to one
    background writer thread (log_batch), and ``close()`` writes the rest after ``trainer.train()`` returns
    or fails (tasks/training.py calls it), so a crashed run keeps its curves up to the crash. One sqlite
    transaction per step cost ~2x the training CPU time of the tiny stages, and even the single final
    log_batch (~1k metrics, ~100k Python calls through SQLAlchemy) showed up inside train() before
    (benchmarks.train_overhead).
    """

    def __init__(self, flush_s: float = 30.0):
        self.flush_s, self.buffer, self.last = flush_s, [], time.monotonic()
        self.run_id: str | None = None
        self._writer, self._pending = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        import mlflow

        run = mlflow.active_run()  # per thread: looked up here, on the training thread, not by the writer
        self.run_id = run.info.run_id if run else None
        self.last = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        from mlflow.entities import Metric

        if not logs or not state.is_world_process_zero or self.run_id is None:
            return
        now = int(time.time() * 1000)
        self.buffer.extend(
            Metric(metric_name(k), float(v), now, state.global_step)
            for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if time.monotonic() - self.last > self.flush_s:
            self._submit()

    def _submit(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self.buffer:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
            batch, self.buffer = self.buffer, []
            self._pending.append(self._writer.submit(_log_metrics, self.run_id, batch))
        self.last = time.monotonic()

    def close(self) -> None:
        """Write what is buffered and wait for the writer; raises the first write error, if any."""
        self._submit()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


def _log_metrics(run_id: str, metrics: list) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
