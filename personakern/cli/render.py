"""Terminal rendering of per-token projections: each token shaded by its reading."""
from __future__ import annotations

import os
import sys
from typing import Sequence

# a diverging 256-colour ramp: blue (below) -> grey -> red (above)
_RAMP = [17, 18, 19, 20, 26, 32, 67, 102, 138, 174, 167, 160, 124, 88, 52]
_BLOCKS = " ▁▂▃▄▅▆▇█"


def use_color(stream=None) -> bool:
    stream = stream or sys.stdout
    return stream.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"


def shade_tokens(tokens: Sequence[str], values: Sequence[float], color: bool, center: float = 0.0) -> str:
    """Tokens with a background colour from blue (low) to red (high), symmetric around ``center``;
    without colour, each token is followed by its value in brackets."""
    finite = [v for v in values if v == v]
    span = max((abs(v - center) for v in finite), default=1.0) or 1.0
    out = []
    for tok, v in zip(tokens, values):
        text = tok.replace("\n", "⏎")
        if not color:
            out.append(f"{text}[{v:+.1f}]")
            continue
        level = round((v - center) / span * (len(_RAMP) // 2)) + len(_RAMP) // 2
        level = min(max(level, 0), len(_RAMP) - 1)
        out.append(f"\x1b[48;5;{_RAMP[level]}m\x1b[97m{text}\x1b[0m")
    return ("" if color else " ").join(out)


def sparkline(values: Sequence[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    scale = (len(_BLOCKS) - 1) / ((hi - lo) or 1.0)
    return "".join(_BLOCKS[int(round((v - lo) * scale))] if v == v else " " for v in values)


def legend(values: Sequence[float], color: bool, center: float = 0.0) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    if not color:
        return f"projection range {lo:+.2f} .. {hi:+.2f}"
    cold = f"\x1b[48;5;{_RAMP[0]}m\x1b[97m low \x1b[0m"
    hot = f"\x1b[48;5;{_RAMP[-1]}m\x1b[97m high \x1b[0m"
    return f"{cold} {lo:+.2f} .. {hi:+.2f} {hot}  (centre {center:+.2f})"
