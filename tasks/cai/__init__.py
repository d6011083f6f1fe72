"""Constitutional AI: the policy critiques and revises its answers under a constitution."""
