"""Benchmarks of petalsd against local `transformers` on the same machine (see BENCHMARKS.md)."""
