"""Benchmarks behind ``personakern bench``: op microbenchmarks and end-to-end decode/prefill
against hooks and peer libraries. Every run is a measurement: medians of interleaved rounds and
ratios taken side by side in one process."""
