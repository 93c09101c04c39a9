"""Compiled kernels behind the non-native backends.

Nothing is imported here on purpose: ``triton_ops`` needs triton at import time, and the
backend modules (:mod:`personakern.backends`) import it lazily so that a missing or unusable
compiler only makes that backend unavailable instead of breaking ``import personakern``.
"""
