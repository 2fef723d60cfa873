"""Continual-learning metrics of DSI++ over an evaluation matrix ``P[n][o]``: Hits@k on corpus
``D_o`` after training through ``D_n`` (defined for ``o <= n``).

* average performance ``A_n = 1/(n+1) * sum_{o<=n} P[n][o]``;
* forgetting ``F_n = 1/n * sum_{o<n} max_{o' in [o, n-1]} (P[o'][o] - P[n][o])``;
* learning accuracy ``LA_n = 1/(n+1) * sum_{o<=n} P[o][o]``;
* forgetting events: a document whose indexing prediction was correct at one evaluation and wrong
  at the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _check(matrix: Sequence[Sequence[float]], n: int, *, rows: range | None = None) -> None:
    if n < 0 or n >= len(matrix):
        raise ValueError(f"step {n} is outside the matrix (0..{len(matrix) - 1})")
    for row in rows if rows is not None else range(n + 1):
        if len(matrix[row]) < row + 1:
            raise ValueError(f"row {row} needs P[{row}][0..{row}]")


def average_performance(matrix: Sequence[Sequence[float]], n: int) -> float:
    """Needs only row ``n`` (earlier rows may be empty: a reference evaluated at step n only)."""
    _check(matrix, n, rows=range(n, n + 1))
    return sum(matrix[n][o] for o in range(n + 1)) / (n + 1)


def forgetting(matrix: Sequence[Sequence[float]], n: int) -> float:
    """Mean drop from each old corpus's best earlier score to its score now (0 at ``n = 0``)."""
    _check(matrix, n)
    if n == 0:
        return 0.0
    drops = [max(matrix[p][o] for p in range(o, n)) - matrix[n][o] for o in range(n)]
    return sum(drops) / n


def learning_accuracy(matrix: Sequence[Sequence[float]], n: int) -> float:
    """Mean score of each corpus right after it was learned."""
    _check(matrix, n)
    return sum(matrix[o][o] for o in range(n + 1)) / (n + 1)


def forgetting_events(
    previous: Mapping[str, bool], current: Mapping[str, bool]
) -> tuple[int, list[str]]:
    """Documents correct in ``previous`` and wrong in ``current`` (documents absent from
    ``previous`` were not yet learned and cannot be forgotten)."""
    forgotten = sorted(doc for doc, ok in previous.items() if ok and not current.get(doc, False))
    return len(forgotten), forgotten


def hits_at(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> float:
    """Fraction of queries with a relevant document in the top ``k`` (0 for no queries)."""
    if not ranked:
        return 0.0
    hits = sum(1 for docs, gold in zip(ranked, relevant, strict=True) if gold & set(docs[:k]))
    return hits / len(ranked)
