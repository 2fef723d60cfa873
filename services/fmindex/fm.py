"""An FM-index over a token-id stream: suffix array → BWT → wavelet matrix, sampled SA.

SEAL needs, for an n-gram ``p``, its corpus count, the tokens that can *follow* it (the primitive
of constrained decoding) and the positions where it occurs. Backward search on an FM-index
naturally extends a pattern to the left, so the index is built over the **reversed** stream:
searching ``p`` there processes ``p[0], p[1], ...`` in order, each step appending one token on the
right, and the BWT symbols inside the current interval are exactly the tokens that follow ``p`` in
the original stream.

Layout (all numpy, saved as ``.npy`` and memory-mapped when loaded):

- symbols are ``token_id + 1``; ``0`` is the unique end sentinel the suffix array needs;
- the BWT is held only as a *wavelet matrix* (one bit plane per bit of the symbol, ``levels`` ≈
  16 for a 49k vocabulary): ``rank_c(i)`` and ``BWT[i]`` each cost ``levels`` bit-rank
  operations, and a bit-rank is a per-512-bit cumulative count plus at most 8 popcounts. This is
  the structure sdsl's ``csa_wt`` uses; a per-symbol occurrence table sampled every b positions
  would cost ``V × N / b`` counters, which for a 49k vocabulary is larger than the corpus;
- the suffix array is sampled at text positions that are multiples of ``sa_sample`` (a marked-row
  bit vector with the same rank directory says which rows hold a sample); ``locate`` walks LF
  until a sampled row, at most ``sa_sample - 1`` steps;
- ``C[c]``: how many symbols of the stream are smaller than ``c``.

The kernels are compiled with numba (pip-installable, no sdsl-lite or SWIG); the build uses
pydivsufsort for the suffix array.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from shared.npy import load_npy

#: Words (64 bits) per rank superblock: one uint32 cumulative count per 512 bits (6.25 % extra).
WORDS_PER_SUPERBLOCK = 8
DEFAULT_SA_SAMPLE = 32

njit: Callable[..., Any] = numba.njit(cache=True, nogil=True)

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit
def _popcount(x: Any) -> Any:
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit
def _rank1(bits: Any, supers: Any, level: int, i: int) -> Any:
    """Ones in ``bits[level]`` before bit position ``i``."""
    word = i >> 6
    superblock = word >> 3
    total = np.int64(supers[level, superblock])
    for w in range(superblock << 3, word):
        total += _popcount(bits[level, w])
    rem = i & 63
    if rem:
        mask = (np.uint64(1) << np.uint64(rem)) - np.uint64(1)
        total += _popcount(bits[level, word] & mask)
    return total


@njit
def _bit(bits: Any, level: int, i: int) -> Any:
    return np.int64((bits[level, i >> 6] >> np.uint64(i & 63)) & np.uint64(1))


@njit
def _rank_symbol(bits: Any, supers: Any, zeros: Any, levels: int, c: int, i: int) -> int:
    """Position of ``i`` after following symbol ``c`` through every level of the matrix."""
    for level in range(levels):
        if (c >> (levels - 1 - level)) & 1:
            i = zeros[level] + _rank1(bits, supers, level, i)
        else:
            i = i - _rank1(bits, supers, level, i)
    return i


@njit
def _extend(
    bits: Any, supers: Any, zeros: Any, levels: int, starts: Any, C: Any, lo: int, hi: int, c: int
) -> tuple[int, int]:
    """One backward-search step: the interval of ``pattern + [c]`` from that of ``pattern``."""
    if c <= 0 or c >= starts.shape[0] or lo >= hi:
        return 0, 0
    base = starts[c]
    new_lo = C[c] + _rank_symbol(bits, supers, zeros, levels, c, lo) - base
    new_hi = C[c] + _rank_symbol(bits, supers, zeros, levels, c, hi) - base
    return new_lo, new_hi


@njit
def _search(
    bits: Any, supers: Any, zeros: Any, levels: int, starts: Any, C: Any, symbols: Any, n: int
) -> tuple[int, int]:
    lo, hi = 0, n
    for c in symbols:
        lo, hi = _extend(bits, supers, zeros, levels, starts, C, lo, hi, c)
        if lo >= hi:
            return 0, 0
    return lo, hi


@njit
def _access(bits: Any, supers: Any, zeros: Any, levels: int, i: int) -> tuple[int, int]:
    """``(BWT[i], rank of BWT[i] before i)``: the symbol and the LF-mapping ingredient."""
    c = 0
    for level in range(levels):
        b = _bit(bits, level, i)
        c = (c << 1) | b
        if b:
            i = zeros[level] + _rank1(bits, supers, level, i)
        else:
            i = i - _rank1(bits, supers, level, i)
    return c, i


@njit
def _distinct(
    bits: Any, supers: Any, zeros: Any, levels: int, lo: int, hi: int, out_sym: Any, out_cnt: Any
) -> int:
    """Distinct symbols of ``BWT[lo:hi]`` with their counts (depth-first over the matrix)."""
    depth = levels + 1
    stack_level = np.empty(2 * depth + 2, dtype=np.int64)
    stack_lo = np.empty(2 * depth + 2, dtype=np.int64)
    stack_hi = np.empty(2 * depth + 2, dtype=np.int64)
    stack_sym = np.empty(2 * depth + 2, dtype=np.int64)
    top = 0
    stack_level[0], stack_lo[0], stack_hi[0], stack_sym[0] = 0, lo, hi, 0
    top = 1
    found = 0
    while top > 0:
        top -= 1
        level, a, b, sym = stack_level[top], stack_lo[top], stack_hi[top], stack_sym[top]
        if level == levels:
            if found < out_sym.shape[0]:
                out_sym[found] = sym
                out_cnt[found] = b - a
            found += 1
            continue
        ones_a = _rank1(bits, supers, level, a)
        ones_b = _rank1(bits, supers, level, b)
        # Push the one-branch first so the zero-branch (smaller symbols) is popped first.
        if ones_b > ones_a:
            stack_level[top] = level + 1
            stack_lo[top] = zeros[level] + ones_a
            stack_hi[top] = zeros[level] + ones_b
            stack_sym[top] = (sym << 1) | 1
            top += 1
        zeros_a, zeros_b = a - ones_a, b - ones_b
        if zeros_b > zeros_a:
            stack_level[top] = level + 1
            stack_lo[top] = zeros_a
            stack_hi[top] = zeros_b
            stack_sym[top] = sym << 1
            top += 1
    return found


@njit
def _locate(
    bits: Any,
    supers: Any,
    zeros: Any,
    levels: int,
    starts: Any,
    C: Any,
    mark_bits: Any,
    mark_supers: Any,
    samples: Any,
    lo: int,
    hi: int,
    out: Any,
) -> None:
    """Suffix-array values (positions in the reversed stream) of rows ``lo .. hi - 1``."""
    for k in range(hi - lo):
        row = lo + k
        steps = 0
        while _bit(mark_bits, 0, row) == 0:
            c, r = _access(bits, supers, zeros, levels, row)
            row = C[c] + r - starts[c]
            steps += 1
        out[k] = samples[_rank1(mark_bits, mark_supers, 0, row)] + steps


def _pack_bits(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit plane (uint64 words, one spare) and its rank directory (uint32 per superblock)."""
    n = int(flags.shape[0])
    n_words = n // 64 + 2
    n_words += (-n_words) % WORDS_PER_SUPERBLOCK
    packed = np.packbits(flags.astype(np.uint8), bitorder="little")
    raw = np.zeros(n_words * 8, dtype=np.uint8)
    raw[: packed.shape[0]] = packed
    words = raw.view(np.uint64)
    per_super = np.bitwise_count(words).reshape(-1, WORDS_PER_SUPERBLOCK).sum(axis=1)
    supers = np.zeros(per_super.shape[0], dtype=np.uint32)
    supers[1:] = np.cumsum(per_super[:-1])
    return words, supers


@dataclass(frozen=True)
class BuildStats:
    tokens: int
    alphabet: int
    levels: int
    seconds: dict[str, float]


class FMIndex:
    """Counting, continuation and locating over one token stream (see the module docstring)."""

    FILES = (
        "wm_bits",
        "wm_supers",
        "wm_zeros",
        "symbol_starts",
        "C",
        "mark_bits",
        "mark_supers",
        "sa_samples",
    )

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.meta = meta
        self.n = int(meta["n"])  # reversed stream + sentinel
        self.levels = int(meta["levels"])
        self.sa_sample = int(meta["sa_sample"])
        # np.asarray drops the memmap subclass (numba wants plain arrays) without copying.
        self._bits = np.asarray(arrays["wm_bits"])
        self._supers = np.asarray(arrays["wm_supers"])
        self._zeros = np.asarray(arrays["wm_zeros"])
        self._starts = np.asarray(arrays["symbol_starts"])
        self._C = np.asarray(arrays["C"])
        self._mark_bits = np.asarray(arrays["mark_bits"])
        self._mark_supers = np.asarray(arrays["mark_supers"])
        self._samples = np.asarray(arrays["sa_samples"])
        counts = np.diff(self._C.astype(np.int64))
        occurring = np.nonzero(counts)[0]
        occurring = occurring[occurring > 0]  # never the sentinel
        #: Tokens that occur at all (SEAL's ``occurring_distinct``) and their counts.
        self.occurring_tokens = (occurring - 1).astype(np.int64)
        self.occurring_counts = counts[occurring].astype(np.int64)

    # --- building ----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        tokens: np.ndarray,
        *,
        sa_sample: int = DEFAULT_SA_SAMPLE,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[FMIndex, BuildStats]:
        """Index ``tokens`` (non-negative ids). The stream is reversed internally."""
        from pydivsufsort import divsufsort

        timings: dict[str, float] = {}
        started = time.perf_counter()
        stream = np.asarray(tokens, dtype=np.int64)
        if stream.size and stream.min() < 0:
            raise ValueError("token ids must be non-negative")
        reversed_symbols = np.empty(stream.shape[0] + 1, dtype=np.int32)
        reversed_symbols[:-1] = stream[::-1] + 1
        reversed_symbols[-1] = 0
        n = int(reversed_symbols.shape[0])
        if progress:
            progress("suffix array")
        suffix_array = np.asarray(divsufsort(reversed_symbols), dtype=np.int64)
        timings["suffix_array"] = time.perf_counter() - started
        mark = time.perf_counter()
        # BWT[i] = R[SA[i] - 1]; SA[i] = 0 wraps to R[n - 1], the sentinel.
        bwt = reversed_symbols[suffix_array - 1].astype(np.int64)
        alphabet = int(reversed_symbols.max()) + 1
        levels = max(1, (alphabet - 1).bit_length())
        if progress:
            progress("wavelet matrix")
        planes, directories, zeros = [], [], []
        current = bwt
        for level in range(levels):
            flags = (current >> (levels - 1 - level)) & 1
            words, supers = _pack_bits(flags)
            planes.append(words)
            directories.append(supers)
            zeros.append(int(flags.shape[0] - flags.sum()))
            current = np.concatenate([current[flags == 0], current[flags == 1]])
        counts = np.bincount(reversed_symbols, minlength=alphabet).astype(np.int64)
        C = np.zeros(alphabet + 1, dtype=np.int64)
        C[1:] = np.cumsum(counts)
        timings["bwt_wavelet"] = time.perf_counter() - mark
        mark = time.perf_counter()
        if progress:
            progress("sampled suffix array")
        sampled_rows = (suffix_array % sa_sample) == 0
        mark_words, mark_supers = _pack_bits(sampled_rows)
        arrays = {
            "wm_bits": np.stack(planes),
            "wm_supers": np.stack(directories),
            "wm_zeros": np.asarray(zeros, dtype=np.int64),
            "symbol_starts": np.zeros(alphabet, dtype=np.uint32),
            "C": C.astype(np.uint32),
            "mark_bits": mark_words[None, :],
            "mark_supers": mark_supers[None, :],
            "sa_samples": suffix_array[sampled_rows].astype(np.uint32),
        }
        meta = {"n": n, "levels": levels, "sa_sample": sa_sample, "alphabet": alphabet}
        index = cls(arrays, meta)
        # Where each symbol's block begins after the last level (rank_c(i) = walk(i) - walk(0)).
        starts = np.zeros(alphabet, dtype=np.int64)
        for c in range(1, alphabet):
            if counts[c]:
                starts[c] = _rank_symbol(index._bits, index._supers, index._zeros, levels, c, 0)
        arrays["symbol_starts"] = starts.astype(np.uint32)
        index = cls(arrays, meta)
        timings["samples"] = time.perf_counter() - mark
        return index, BuildStats(n - 1, alphabet, levels, timings)

    def save(self, directory: Path) -> dict[str, int]:
        """Write every array as ``.npy`` plus ``fm.json``; returns bytes per file."""
        directory.mkdir(parents=True, exist_ok=True)
        sizes: dict[str, int] = {}
        arrays = self._arrays()
        for name in self.FILES:
            path = directory / f"{name}.npy"
            np.save(path, arrays[name])
            sizes[name] = path.stat().st_size
        (directory / "fm.json").write_text(json.dumps(self.meta))
        return sizes

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "wm_bits": self._bits,
            "wm_supers": self._supers,
            "wm_zeros": self._zeros,
            "symbol_starts": self._starts,
            "C": self._C,
            "mark_bits": self._mark_bits,
            "mark_supers": self._mark_supers,
            "sa_samples": self._samples,
        }

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> FMIndex:
        meta = json.loads((directory / "fm.json").read_text())
        arrays = {
            name: load_npy(directory / f"{name}.npy", mmap_mode="r" if mmap else None)
            for name in cls.FILES
        }
        return cls(arrays, meta)

    @property
    def alphabet_bytes(self) -> int:
        """The part that grows with the vocabulary, not the corpus (``C`` and symbol starts)."""
        return int(self._C.nbytes + self._starts.nbytes)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._arrays().values()))

    # --- queries -----------------------------------------------------------------------------

    def _symbols(self, ngram: Any) -> np.ndarray:
        return np.asarray(ngram, dtype=np.int64) + 1

    def full_range(self) -> tuple[int, int]:
        """The interval of the empty n-gram (every row)."""
        return 0, self.n

    def extend(self, lo: int, hi: int, token: int) -> tuple[int, int]:
        """Interval of ``ngram + [token]`` from the interval of ``ngram``."""
        lo2, hi2 = _extend(
            self._bits, self._supers, self._zeros, self.levels, self._starts, self._C,
            lo, hi, token + 1,
        )  # fmt: skip
        return int(lo2), int(hi2)

    def range(self, ngram: Any) -> tuple[int, int]:
        """BWT interval ``[lo, hi)`` of the n-gram; empty (0, 0) when it does not occur."""
        symbols = self._symbols(ngram)
        if symbols.size == 0:
            return self.full_range()
        lo, hi = _search(
            self._bits, self._supers, self._zeros, self.levels, self._starts, self._C,
            symbols, self.n,
        )  # fmt: skip
        return int(lo), int(hi)

    def count(self, ngram: Any) -> int:
        """Occurrences of the n-gram in the stream (overlapping occurrences all count)."""
        if len(ngram) == 0:
            return self.n - 1
        lo, hi = self.range(ngram)
        return hi - lo

    def continuations_in(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct next tokens of the n-gram whose interval is ``[lo, hi)``, with counts."""
        if lo >= hi:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if lo == 0 and hi == self.n:
            return self.occurring_tokens, self.occurring_counts
        size = min(hi - lo, int(self._C.shape[0]))
        symbols = np.empty(size, dtype=np.int64)
        counts = np.empty(size, dtype=np.int64)
        found = _distinct(
            self._bits, self._supers, self._zeros, self.levels, lo, hi, symbols, counts
        )
        symbols, counts = symbols[:found], counts[:found]
        keep = symbols > 0  # the sentinel precedes the whole reversed stream: not a token
        return symbols[keep] - 1, counts[keep]

    def continuations(self, ngram: Any) -> dict[int, int]:
        """``{next token: count}`` over every occurrence of the n-gram."""
        tokens, counts = self.continuations_in(*self.range(ngram))
        return dict(zip(tokens.tolist(), counts.tolist(), strict=True))

    def locate_rows(self, lo: int, hi: int, limit: int | None = None) -> np.ndarray:
        """Start positions (in the original stream) of the occurrences in rows ``[lo, hi)`` of an
        n-gram of ``length`` tokens — see :meth:`locate`; here, raw reversed-stream positions."""
        if limit is not None:
            hi = min(hi, lo + limit)
        out = np.empty(max(0, hi - lo), dtype=np.int64)
        if hi > lo:
            _locate(
                self._bits, self._supers, self._zeros, self.levels, self._starts, self._C,
                self._mark_bits, self._mark_supers, self._samples, lo, hi, out,
            )  # fmt: skip
        return out

    def locate(self, ngram: Any, limit: int | None = None) -> np.ndarray:
        """Start positions of the n-gram in the original stream (unsorted; at most ``limit``)."""
        length = len(ngram)
        lo, hi = self.range(ngram)
        return self.positions(self.locate_rows(lo, hi, limit), length)

    def positions(self, reversed_positions: np.ndarray, length: int) -> np.ndarray:
        """Map reversed-stream suffix starts of a ``length``-token match to original starts."""
        # The match occupies R[j : j + length] = reversed(p); p ends at N - 1 - j.
        return (self.n - 1) - reversed_positions - length
