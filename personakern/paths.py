"""Where personakern keeps what it builds and converts: one cache folder for the whole package
(compiled extensions, converted models, computed vectors), low in the import graph so that the
backends and the model loader read the same path."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PERSONAKERN_CACHE``, or ``~/.cache/personakern`` when it is unset or empty."""
    return Path(os.environ.get("PERSONAKERN_CACHE") or Path.home() / ".cache" / "personakern")
