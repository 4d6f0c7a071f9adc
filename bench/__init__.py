"""Benchmarks: each measures the project and the notebook's baseline in the same run."""
