"""Task pools: evaluate a model on a set of tasks and return a FusionBench-style report."""
