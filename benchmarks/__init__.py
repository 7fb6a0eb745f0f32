"""posenc's benchmarks and study: run each entry point from the repository root as a module,
e.g. ``python -m benchmarks.speed`` or ``python -m benchmarks.study --report-only``."""
