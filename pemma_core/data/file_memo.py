"""What a file's content gives, kept in this process until the file changes.

A site re-reads its manifest and clinical CSV at every round (the data may change between
runs of a long-lived SuperNode); parsing them with pandas is most of a round's data set-up,
and in a simulation the sites' threads contend for the interpreter lock while they do it.
A file's version is its inode, size and modification and change times in nanoseconds, the
same test build tools use: an edit that kept all four would be missed.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["FileMemo", "file_version"]

T = TypeVar("T")


def file_version(path: str | Path) -> tuple[int, int, int, int] | None:
    """(inode, size, mtime_ns, ctime_ns) of ``path``; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileMemo(Generic[T]):
    """The last ``size`` values built from files, each reused while its files are unchanged.

    A failed build is not kept (the next call raises again), nor is a value whose file is missing."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._values: collections.OrderedDict[Hashable, tuple[tuple, T]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, paths: Sequence[str | Path], build: Callable[[], T]) -> T:
        versions = tuple(file_version(p) for p in paths)
        if None not in versions:
            with self._lock:
                kept = self._values.get(key)
                if kept is not None and kept[0] == versions:
                    self._values.move_to_end(key)
                    return kept[1]
        value = build()
        if None not in versions:
            with self._lock:
                self._values[key] = (versions, value)
                self._values.move_to_end(key)
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
        return value
