"""Held-out evaluation: metric definitions (metrics.py) and the evaluate stage (stage.py)."""
