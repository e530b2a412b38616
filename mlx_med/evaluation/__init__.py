"""Evaluation: generation, metrics, the eval runner, safety screen, sweeps and the report."""
