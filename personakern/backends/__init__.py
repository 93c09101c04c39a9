"""Backends implement the ops of :mod:`personakern.ops`. ``native`` (pure PyTorch) is always
available and is the reference the others are tested against."""
