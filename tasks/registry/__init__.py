"""MLflow: tracking (runs, params, curves), registry versions (the only writer) and promotion gates."""
