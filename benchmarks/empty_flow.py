"""An empty flow, deployed by benchmarks/demo.py to the same work pool as align/full: what a flow run costs in
Prefect's deployment machinery alone (scheduling, the worker's poll, a flow-run process, its start-up), to set
an unchanged re-run of align/full against."""

from prefect import flow


@flow(name="empty")
def empty(recipe: str = "", output: str | None = None, runs: str | None = None) -> None:
    """Takes align/full's parameters and does nothing."""
