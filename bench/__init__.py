"""Benchmarks; run each as ``python -m bench.<name>`` from the repository root. ``helpers`` is shared with tests/."""
