"""``shared.serve.limit_malloc_arenas``: threads started after the cap share at most that many
glibc heaps (counted by glibc's own ``malloc_stats``, in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys, threading
from shared.serve import limit_malloc_arenas
cap = int(sys.argv[1])
assert limit_malloc_arenas(cap) == bool(cap)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()  # all eight alive at once: none can inherit another's freed heap
    libc.malloc(64)
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.malloc_stats()
"""


def heaps(cap: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cap)], capture_output=True, text=True, check=True
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_the_cap_bounds_the_heaps_of_new_threads() -> None:
    assert heaps(0) > 2  # glibc's default: a heap per thread, up to 8 per core
    assert heaps(2) == 2
    assert heaps(1) == 1
