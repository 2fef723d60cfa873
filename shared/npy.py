"""``np.load`` behind one process-wide lock.

numpy parses every ``.npy`` header with ``ast.literal_eval``, and CPython 3.11's AST builder can
raise ``SystemError: AST constructor recursion depth mismatch`` when threads parse at once
(python/cpython#106905, fixed in later releases). Services load versions from request threads
while writes publish new ones, so the rare failure is a 500 under concurrency (seen in
``tests/integration/test_index_engine.py``'s searches during writes). A header is a few hundred
bytes: serialising the parse costs nothing measurable; a memory map's data is read outside it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

_LOCK = threading.Lock()


def load_npy(path: Path, mmap_mode: Literal["r"] | None = None) -> np.ndarray[Any, Any]:
    """One ``.npy`` array (memory-mapped read-only with ``mmap_mode="r"``)."""
    with _LOCK:
        array: np.ndarray[Any, Any] = np.load(path, mmap_mode=mmap_mode)
    return array


def load_npz(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Every array of an ``.npz`` file, read into memory."""
    with _LOCK, np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}
