"""Training stages over TRL: the method table and stage mechanics (stage.py), models, templates, generation."""
