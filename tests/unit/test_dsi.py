"""DSI++ building blocks: docids, the constrained decoder, SAM and the continual metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from services.dsi.docids import DocidScheme, Trie, docid_text, parse_docid
from services.dsi.metrics import (
    average_performance,
    forgetting,
    forgetting_events,
    hits_at,
    learning_accuracy,
)
from services.dsi.model import T5Dsi, T5Shape, build_trie, max_decode_steps
from services.dsi.sam import SAM
from services.dsi.training import rank_docids

TINY = T5Shape(d_model=32, layers=1, heads=2, d_ff=64, dropout=0.0)


def _blobs(per_blob: int, blobs: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Well separated unit-norm clusters: the hierarchy's top level must recover them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:blobs] * 10
    points = np.concatenate(
        [c + rng.normal(scale=0.3, size=(per_blob, dim)).astype(np.float32) for c in centres]
    )
    normalised: np.ndarray = points / np.linalg.norm(points, axis=1, keepdims=True)
    return normalised


def test_semantic_docids_are_unique_prefix_free_and_follow_the_clusters() -> None:
    vectors = _blobs(per_blob=130, blobs=3)
    ids = [f"doc{i}" for i in range(len(vectors))]
    scheme = DocidScheme.create("semantic", ids, vectors, k=10, leaf_size=100)
    docids = [scheme.docid_of[i] for i in ids]
    assert len(set(docids)) == len(docids)
    # No docid is a proper prefix of another: decoding can always tell where one ends.
    as_set = set(docids)
    for docid in docids:
        assert not any(docid[:cut] in as_set for cut in range(1, len(docid)))
    # Leaves hold at most c documents: positions run 0..c-1.
    assert max(d[-1] for d in docids) < 100
    # Prefix consistency: documents of one blob share their top-level cluster; no cluster mixes
    # blobs (k-means with k = 10 over 3 separated blobs splits blobs, never merges them).
    top_of_blob = [{docids[b * 130 + i][0] for i in range(130)} for b in range(3)]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(top_of_blob, 2))
    # Each leaf (docids minus the position) holds documents of a single blob.
    leaves: dict[tuple[int, ...], set[int]] = {}
    for row, docid in enumerate(docids):
        leaves.setdefault(docid[:-1], set()).add(row // 130)
    assert all(len(blobs) == 1 for blobs in leaves.values())


def test_new_documents_descend_the_hierarchy_without_renumbering_old_ones() -> None:
    vectors = _blobs(per_blob=130, blobs=3)
    ids = [f"doc{i}" for i in range(len(vectors))]
    scheme = DocidScheme.create("semantic", ids, vectors, k=10, leaf_size=100)
    before = dict(scheme.docid_of)
    new_vectors = _blobs(per_blob=2, blobs=3, seed=7)
    new_ids = [f"new{i}" for i in range(len(new_vectors))]
    new = scheme.extend(new_ids, new_vectors)
    assert {k: scheme.docid_of[k] for k in before} == before
    assert len(set(scheme.doc_of)) == len(ids) + len(new_ids)
    tops = [{before[f"doc{b * 130 + i}"][0] for i in range(130)} for b in range(3)]
    for row, docid in enumerate(new):
        assert docid[0] in tops[row // 2], "a new document joins its own blob's subtree"
    restored = DocidScheme.from_json(scheme.to_json())
    assert restored.docid_of == scheme.docid_of


def test_atomic_and_naive_docids() -> None:
    atomic = DocidScheme.create("atomic", [f"d{i}" for i in range(12)])
    assert atomic.docid_of["d11"] == (11,)
    naive = DocidScheme.create("naive", [f"d{i}" for i in range(12)])
    assert naive.docid_of["d1"] == (1,) and naive.docid_of["d10"] == (1, 0)
    assert parse_docid(docid_text((3, 0, 17))) == (3, 0, 17)
    with pytest.raises(ValueError):
        atomic.extend(["d3"])


def test_trie_children_and_membership() -> None:
    trie = Trie()
    trie.add([2, 0])
    trie.add([2, 1, 0])
    assert sorted(trie.children([])) == [2]
    assert sorted(trie.children([2])) == [0, 1]
    assert trie.contains([2, 0]) and trie.contains([2, 1, 0])
    assert not trie.contains([2]) and not trie.contains([2, 1]) and not trie.contains([3, 0])
    assert trie.children([5]) == []


@pytest.mark.parametrize("kind", ["atomic", "naive", "semantic"])
def test_constrained_beam_search_only_emits_valid_docids(kind: str) -> None:
    torch.manual_seed(0)
    ids = [f"d{i}" for i in range(37)]
    vectors = _blobs(per_blob=37, blobs=1) if kind == "semantic" else None
    scheme = DocidScheme.create(kind, ids, vectors, k=3, leaf_size=5)  # type: ignore[arg-type]
    model = T5Dsi(TINY)
    # Extra docid tokens nobody uses: an untrained model gives them probability mass, and the
    # trie must still keep every beam on a real docid.
    model.ensure_docid_tokens(scheme.max_token_value + 20)
    valid = list(scheme.doc_of)
    trie = build_trie(model, valid)
    texts = ["a question about lighthouses", "another text", "x"]
    ranked = rank_docids(
        model,
        texts,
        trie,
        beam=10,
        max_tokens=16,
        max_steps=max_decode_steps(valid),
        to_docid=model.docid_of_symbols,
    )
    for row in ranked:
        assert len(row) == 10
        assert all(docid in scheme.doc_of for docid, _ in row)
        assert len({docid for docid, _ in row}) == len(row), "no docid twice in one list"
        scores = [score for _, score in row]
        assert scores == sorted(scores, reverse=True)


def test_sam_restores_the_weights_before_the_optimiser_steps_with_the_perturbed_gradient() -> None:
    x = torch.tensor([1.0, 2.0])
    y = torch.tensor(1.0)
    w0 = torch.tensor([0.5, -0.25])
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0[None])

    seen_at_step: list[torch.Tensor] = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def,override]
            seen_at_step.append(model.weight.detach().clone()[0])
            return super().step(closure)

    lr, rho = 0.1, 0.05
    sam = SAM(RecordingSGD(model.parameters(), lr=lr), rho=rho)
    sam.step(lambda: (model(x[None])[0, 0] - y) ** 2)

    # By hand: L(w) = (w.x - y)^2, g = 2 (w.x - y) x.
    residual = float(w0 @ x - y)  # 0.5 - 0.5 - 1 = -1
    g = 2 * residual * x  # [-2, -4]
    e = rho * g / torch.linalg.vector_norm(g)
    g_perturbed = 2 * float((w0 + e) @ x - y) * x
    expected = w0 - lr * g_perturbed
    assert torch.allclose(seen_at_step[0], w0), "weights restored before the base step"
    assert torch.allclose(model.weight.detach()[0], expected, atol=1e-6)
    # It is not plain SGD: the perturbed gradient differs from g.
    assert not torch.allclose(expected, w0 - lr * g)


def test_sam_rejects_a_second_step_without_a_first() -> None:
    model = torch.nn.Linear(2, 1)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(RuntimeError):
        sam.second_step()
    with pytest.raises(ValueError):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0)


# P[n][o]: Hits on D_o after training through D_n (a worked example).
P = [
    [0.8],
    [0.6, 0.7],
    [0.5, 0.4, 0.9],
]


def test_average_performance_worked_example() -> None:
    assert average_performance(P, 0) == pytest.approx(0.8)
    assert average_performance(P, 1) == pytest.approx(0.65)
    assert average_performance(P, 2) == pytest.approx(0.6)
    # A_n reads row n only: a reference evaluated at the last step alone still has A_n.
    assert average_performance([[], [], P[2]], 2) == pytest.approx(0.6)


def test_forgetting_worked_example() -> None:
    assert forgetting(P, 0) == 0.0
    assert forgetting(P, 1) == pytest.approx(0.2)  # 0.8 -> 0.6
    # D0: best of P00, P10 = 0.8 -> 0.5 (0.3); D1: best of P11 = 0.7 -> 0.4 (0.3).
    assert forgetting(P, 2) == pytest.approx(0.3)
    # The max is over earlier steps, so recovering then dropping counts from the peak.
    assert forgetting([[0.2], [0.6, 0.5], [0.1, 0.5, 0.3]], 2) == pytest.approx(0.25)


def test_learning_accuracy_worked_example() -> None:
    assert learning_accuracy(P, 2) == pytest.approx((0.8 + 0.7 + 0.9) / 3)
    with pytest.raises(ValueError):
        learning_accuracy(P, 3)


def test_forgetting_events_count_correct_to_wrong_only() -> None:
    before = {"a": True, "b": True, "c": False}
    after = {"a": False, "b": True, "c": True, "d": False}
    count, docs = forgetting_events(before, after)
    assert count == 1 and docs == ["a"]


def test_hits_at_k() -> None:
    ranked = [["a", "b", "c"], ["x", "y"], []]
    gold = [{"b"}, {"z"}, {"a"}]
    assert hits_at(ranked, gold, 1) == 0.0
    assert hits_at(ranked, gold, 2) == pytest.approx(1 / 3)
    assert hits_at([], [], 10) == 0.0
