"""Benchmarks: `python -m ithaca.bench.<topic> --device cpu|cuda`; results in bench/RESULTS.md."""
