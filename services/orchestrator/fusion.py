"""Fusion of first-stage ranked lists: reciprocal rank fusion (RRF)."""

from __future__ import annotations

from shared.schemas import Hit, SourceRank


def reciprocal_rank_fusion(ranked_lists: dict[str, list[Hit]], rrf_k: int, k: int) -> list[Hit]:
    """RRF (Cormack et al. 2009): score(d) = Σ_r 1 / (rrf_k + rank_r(d)), ranks 1-based.

    Ties break by the best single rank, then by doc id, so the order is deterministic. A hit
    takes its title, text and passage from the first list that has it, or from the first that
    sent its text (a list asked with ``text_k`` sends none past that rank).
    """
    fused: dict[str, Hit] = {}
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for retriever, hits in ranked_lists.items():
        for rank, hit in enumerate(hits, start=1):
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + 1.0 / (rrf_k + rank)
            best_rank[hit.doc_id] = min(best_rank.get(hit.doc_id, rank), rank)
            entry = fused.get(hit.doc_id)
            if entry is None:
                entry = fused[hit.doc_id] = Hit(
                    doc_id=hit.doc_id,
                    title=hit.title,
                    text=hit.text,
                    score=0.0,
                    passage=hit.passage,
                )
            elif not entry.text and hit.text:
                entry.text, entry.passage = hit.text, hit.passage
            entry.sources[retriever] = SourceRank(rank=rank, score=hit.score)
    order = sorted(fused, key=lambda d: (-scores[d], best_rank[d], d))[:k]
    return [fused[d].model_copy(update={"score": scores[d]}) for d in order]
