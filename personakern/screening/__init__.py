"""Data screening and fine-tuning shift (docs/design.md#the-method, steps 6 and 7)."""
from .data import Malformed, Sample, ScreenDataError, parse_line
from .screen import ScreenSettings, check_data, screen
from .shift import ShiftError, fine_tuning_shift

__all__ = ["screen", "check_data", "ScreenSettings", "ScreenDataError", "Sample", "Malformed", "parse_line",
           "fine_tuning_shift", "ShiftError"]
