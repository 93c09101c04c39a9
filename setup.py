"""Build script; the metadata lives in pyproject.toml.

The C++/CUDA sources are package data (personakern/csrc), so every install carries them and the
backends can build them just in time. Where torch and a C++ compiler are importable when the
package is built (``pip install --no-build-isolation .``, ``pip wheel --no-build-isolation .``,
``install.sh``'s editable install), the CPU extension is also compiled here, ahead of time, with
the flags of the just-in-time build (personakern/backends/cpu_build.py), and a build record is
written beside it; at run time it is used only if that record matches (torch, SIMD level,
sources), else the just-in-time build runs. Under build isolation torch is absent (it is
deliberately not a build requirement: that would fetch a multi-GB CUDA torch) and the package
builds without the extension. ``PERSONAKERN_AOT=0`` skips the ahead-of-time build.
"""
import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cpu_build():
    # by path: the package itself (and torch through it) must not be imported to build it
    spec = importlib.util.spec_from_file_location("_personakern_cpu_build",
                                                  ROOT / "personakern" / "backends" / "cpu_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip(why):
    print(f"personakern: not building the CPU extension ahead of time ({why}); "
          "it is built just in time from the installed sources on first use", file=sys.stderr)
    return {}


def _aot_kwargs():
    if os.environ.get("PERSONAKERN_AOT", "1") == "0":
        return _skip("PERSONAKERN_AOT=0")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return _skip("torch is not importable here, e.g. under build isolation")
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return _skip(f"no C++ compiler ({compiler})")
    spec = _cpu_build()
    cap = spec.capability(torch.backends.cpu.get_cpu_capability(), platform.machine(), spec.cpu_flags())
    record = spec.record(torch.__version__, cap, platform.machine(), spec.SRC_DIR)

    class BuildCpuExtension(BuildExtension):
        """Writes the build record beside the library (the built one, or its in-place copy in
        an editable install), and lets a failed compile leave the package without the library:
        the just-in-time build then reports the compiler's error at run time."""

        def run(self):
            self.failed = set()
            if self.inplace and all(self._current(ext) for ext in self.extensions):
                # a repeated editable install (install.sh run again): the library in place is
                # this very build, a recompile would only cost a minute or two
                print("personakern: the CPU extension in place is up to date", file=sys.stderr)
                return
            super().run()  # setuptools: builds into build_lib, then copies in place if asked
            for ext in self.extensions:
                if ext.name not in self.failed:
                    library = Path(self.get_ext_fullpath(ext.name))
                    record_path = library.parent / f"{spec.EXT_NAME}{spec.RECORD_SUFFIX}"
                    record_path.write_text(json.dumps(record, indent=1) + "\n")

        def _current(self, ext):
            library = Path(self.get_ext_fullpath(ext.name))
            return library.is_file() and spec.read_record(
                library.parent / f"{spec.EXT_NAME}{spec.RECORD_SUFFIX}") == record

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any failure leaves a usable package
                self.failed.update(ext.name for ext in self.extensions)
                print(f"personakern: the ahead-of-time CPU build failed ({exc}); continuing without it",
                      file=sys.stderr)

        def copy_extensions_to_source(self):
            built, self.extensions = self.extensions, [e for e in self.extensions if e.name not in self.failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = built

    sources = [str(p.relative_to(ROOT)) for p in spec.sources(spec.SRC_DIR) if p.suffix == ".cpp"]
    # -g0 last: Python's own CFLAGS, which setuptools puts first, carry -g (the just-in-time
    # build has none; debug info would make the library ten times larger)
    ext = CppExtension(f"personakern.backends.{spec.EXT_NAME}", sources,
                       extra_compile_args={"cxx": spec.flags(cap) + ["-g0"]}, extra_link_args=spec.LINK_FLAGS)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildCpuExtension}}


setup(**_aot_kwargs())
