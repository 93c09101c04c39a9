"""Small file helpers shared by the pipeline: atomic writes and a crash-safe JSONL log."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temp file beside ``path``; it is fsynced and renamed over ``path``.
    An existing file is either untouched (any exception) or fully replaced, never half written;
    its permission bits are kept."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644  # mkstemp makes 0600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n")


class JsonlLog:
    """Append-only JSONL file for results that must survive interruption.

    Each ``append`` writes whole lines and fsyncs, so a crash loses at most the records being
    written. On open, a torn last line (no trailing newline, or not valid JSON) — what a kill in
    the middle of a write leaves — is cut off with a warning; a bad line elsewhere is an error
    naming its line number, since that is not something a crash produces.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if not raw:
            return
        lines = raw.split(b"\n")
        keep = len(raw)
        if not raw.endswith(b"\n"):  # torn final line
            keep = len(raw) - len(lines[-1])
        else:
            last = lines[-2]
            try:
                json.loads(last)
            except ValueError:
                keep = len(raw) - len(last) - 1
        for i, line in enumerate(raw[:keep].split(b"\n")[:-1]):
            try:
                json.loads(line)
            except ValueError:
                raise ValueError(f"{self.path}:{i + 1}: not a JSON line (the cache is damaged; "
                                 f"delete it to start over)") from None
        if keep != len(raw):
            warnings.warn(f"{self.path}: dropping an incomplete last record (interrupted write)")
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def read(self) -> List[dict]:
        return list(self)

    def append(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        if not data:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
