"""Monitoring you can see: plots of per-token projections (the terminal shading lives in
``personakern.cli.render``)."""
from .plot import plot_traces, trace_series

__all__ = ["plot_traces", "trace_series"]
