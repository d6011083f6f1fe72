"""Local services (Prefect + MLflow servers, workers) and the demo: `python -m scripts up|demo|status|down`."""
