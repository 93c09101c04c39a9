"""What one build of the CPU extension is: its sources, its compiler flags per SIMD level, and the
record an ahead-of-time build leaves beside its library.

Both builders use this file, so the two produce the same library: ``setup.py`` (ahead of time,
where torch is importable when the package is built) and :mod:`personakern.backends.cpu` (just
in time, from the sources shipped in the package). No torch and no personakern import here:
``setup.py`` loads this file by its path, before the package is importable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

EXT_NAME = "personakern_cpu_ops"
# package data: the sources travel with every install (wheel, sdist, editable)
SRC_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cpu"
RECORD_SUFFIX = ".build.json"
# what an ahead-of-time library must have been built with to be loaded
RECORD_KEYS = ("torch", "capability", "flags", "sources", "machine")

# Compiler flags per ATen SIMD level, the same ISA sets ATen compiles its own kernels with. Not
# -march=native: a build must never use instructions the level does not promise.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
}
# AVX512 plus the BF16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later):
# rounding float32 to bfloat16 in one instruction instead of ATen's eight integer operations,
# which made the bf16 kernels compute-bound (csrc/cpu/row_math.h). ATen's own code is AVX512.
ISA_FLAGS["AVX512_BF16"] = ISA_FLAGS["AVX512"] + ["-mavx512bf16"]
ATEN_LEVEL = {"AVX512_BF16": "AVX512"}
#: from narrowest to widest (each supports what the ones before it do)
LEVELS = ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The processor's feature flags as the kernel reports them (Linux); empty elsewhere."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def capability(torch_capability: str, machine: str, flags_present: frozenset = frozenset()) -> str:
    """The SIMD level to compile for, from ``torch.backends.cpu.get_cpu_capability()``,
    ``platform.machine()`` and the processor's flags (:func:`cpu_flags`). Only x86 levels get
    their vector path; others build ATen's portable (or NEON) code."""
    if machine.lower() not in ("x86_64", "amd64") or torch_capability not in ("AVX512", "AVX2"):
        return "DEFAULT"
    if torch_capability == "AVX512" and "avx512_bf16" in flags_present:
        return "AVX512_BF16"
    return torch_capability


def flags(cap: str) -> list[str]:
    # -ffp-contract=off: a product must stay rounded before it is added wherever the reference
    # rounds it (the squares of RMSNorm); explicit FMAs are written as such.
    out = ["-O3", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-DNDEBUG"]
    # A namespace of our own keeps our inline ATen vector functions from ever being merged with
    # libtorch's copies built for a different ISA.
    out += [f"-DCPU_CAPABILITY=personakern_{cap.lower()}"]
    if cap != "DEFAULT":
        out += [f"-DCPU_CAPABILITY_{ATEN_LEVEL.get(cap, cap)}"] + ISA_FLAGS[cap]
    if cap == "AVX512_BF16":
        out += ["-DPK_AVX512_BF16"]
    return out


LINK_FLAGS = ["-fopenmp"]


def sources(src_dir: Path = SRC_DIR) -> list[Path]:
    """Every file of the build (the .cpp files compiled, the headers they include)."""
    return sorted(p for p in Path(src_dir).glob("*") if p.suffix in (".cpp", ".h"))


def sources_digest(src_dir: Path = SRC_DIR) -> str:
    digest = hashlib.sha256()
    for src in sources(src_dir):
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()


def record(torch_version: str, cap: str, machine: str, src_dir: Path = SRC_DIR) -> dict:
    """What a library built here and now from ``src_dir`` is built with."""
    return {"torch": torch_version, "capability": cap, "flags": flags(cap),
            "sources": sources_digest(src_dir), "machine": machine}


def read_record(path: Path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mismatch(built: Optional[dict], wanted: dict) -> Optional[str]:
    """None when a library built as ``built`` says is what this process would build now
    (``wanted``), else why not. A library for another torch may not even load, one for a wider
    SIMD level may crash on this CPU, one from other sources is another program."""
    if built is None:
        return "its build record is missing or unreadable"
    for key in RECORD_KEYS:
        if built.get(key) != wanted[key]:
            if key == "sources":
                return "it was built from other sources than the ones installed"
            if key == "capability":
                return (f"it was built for the {built.get(key)} SIMD level, this machine's torch "
                        f"runs {wanted[key]}")
            return f"it was built with {key} {built.get(key)!r}, this process has {wanted[key]!r}"
    return None
