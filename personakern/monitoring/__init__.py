"""Monitoring you can see: plots of per-token projections, a self-contained HTML page of them
(:mod:`.html`, ``Readings.to_html()``; the terminal shading lives in ``personakern.cli.render``),
and the statistic of the paper's monitoring experiment (:func:`correlate`: last-prompt-token
projection vs judged trait score)."""
from .correlate import correlate, fisher_ci, pearson
from .plot import plot_traces, trace_series

__all__ = ["plot_traces", "trace_series", "correlate", "pearson", "fisher_ci"]
