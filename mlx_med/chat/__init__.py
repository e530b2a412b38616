"""The chat REPL and its session engine."""
