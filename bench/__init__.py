"""Benchmarks: ``python -m bench NAME``. Each prints its figures beside baselines measured
in the same run, because these machines are shared and noisy."""
