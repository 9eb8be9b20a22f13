"""Benchmarks: `python -m bench.<topic> --device cpu|cuda`; results in bench/RESULTS.md."""
