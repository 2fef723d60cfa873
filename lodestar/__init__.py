"""The ``lodestar`` command line, the local stack runner, evaluation and benchmarks."""
