"""Using registered models: MLflow pyfunc wrappers (chat policy, reward scorer), file scoring, a chat REPL."""
