"""Build script. The metadata lives in pyproject.toml; this file exists for the compiled
backends (csrc/), which are added as extensions here when they land."""
from setuptools import setup

setup()
