"""The FM-index held to a naive substring search on random corpora: counts, continuations,
locate; and a save / memory-mapped load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.fmindex.fm import FMIndex


def naive_occurrences(stream: list[int], ngram: list[int]) -> list[int]:
    m = len(ngram)
    return [i for i in range(len(stream) - m + 1) if stream[i : i + m] == ngram]


def naive_continuations(stream: list[int], ngram: list[int]) -> dict[int, int]:
    following: dict[int, int] = {}
    for i in naive_occurrences(stream, ngram):
        if i + len(ngram) < len(stream):
            token = stream[i + len(ngram)]
            following[token] = following.get(token, 0) + 1
    return following


corpora = st.integers(min_value=1, max_value=40).flatmap(
    lambda vocab: st.tuples(
        st.lists(st.integers(0, vocab - 1), min_size=1, max_size=300),
        st.lists(st.lists(st.integers(0, vocab + 1), min_size=1, max_size=5), max_size=15),
        st.integers(min_value=1, max_value=9),
    )
)


@settings(max_examples=60, deadline=None)
@given(corpora)
def test_fm_index_agrees_with_naive_search(case: tuple[list[int], list[list[int]], int]) -> None:
    stream, probes, sa_sample = case
    fm, stats = FMIndex.build(np.asarray(stream), sa_sample=sa_sample)
    assert stats.tokens == len(stream)
    # Probe both random n-grams (mostly absent) and substrings that certainly occur.
    rng = np.random.default_rng(len(stream))
    for _ in range(10):
        m = int(rng.integers(1, 6))
        if m <= len(stream):
            start = int(rng.integers(0, len(stream) - m + 1))
            probes.append(stream[start : start + m])
    for ngram in probes:
        expected = naive_occurrences(stream, ngram)
        assert fm.count(ngram) == len(expected)
        assert sorted(fm.locate(ngram).tolist()) == expected
        assert fm.continuations(ngram) == naive_continuations(stream, ngram)
        # The incremental interval (what decoding keeps per beam) equals the direct search.
        lo, hi = fm.full_range()
        for token in ngram:
            lo, hi = fm.extend(lo, hi, token)
        assert (hi - lo) == len(expected)


def test_empty_prefix_continues_with_every_occurring_token() -> None:
    stream = [3, 1, 3, 3, 7]
    fm, _ = FMIndex.build(np.asarray(stream))
    tokens, counts = fm.continuations_in(*fm.full_range())
    assert dict(zip(tokens.tolist(), counts.tolist(), strict=True)) == {1: 1, 3: 3, 7: 1}
    assert fm.count([]) == len(stream)


def test_locate_limit_and_memory_mapped_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    stream = rng.integers(0, 50, size=5000)
    fm, _ = FMIndex.build(stream, sa_sample=16)
    sizes = fm.save(tmp_path / "fm")
    assert sum(sizes.values()) > 0
    loaded = FMIndex.load(tmp_path / "fm")
    assert isinstance(np.load(tmp_path / "fm" / "wm_bits.npy", mmap_mode="r"), np.memmap)
    ngram = stream[100:102].tolist()
    expected = naive_occurrences(stream.tolist(), ngram)
    assert loaded.count(ngram) == len(expected)
    assert sorted(loaded.locate(ngram).tolist()) == expected
    assert len(loaded.locate(ngram, limit=1)) == 1
    assert loaded.continuations(ngram) == fm.continuations(ngram)


def test_large_vocabulary_stays_small() -> None:
    """A 49k vocabulary (SmolLM2's) needs 16 bit planes, not a per-symbol occurrence table."""
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 49152, size=200_000)
    fm, stats = FMIndex.build(stream)
    assert stats.levels == 16
    assert fm.alphabet_bytes == 4 * (2 * 49153 + 1)  # C and symbol starts, uint32 each
    assert fm.nbytes - fm.alphabet_bytes < 1.5 * stream.astype(np.uint16).nbytes
    ngram = stream[5000:5010].tolist()
    assert fm.count(ngram) >= 1
    assert 5000 in fm.locate(ngram).tolist()
