"""The fmindex service as a real process on loopback: an FM-index over real Wikipedia summaries,
the real (untuned) SmolLM2 as generator, ``POST /search`` under the index service's contract with
explainable hits, typed errors, and the orchestrator fusing ``fm`` with BM25 over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.fmindex.corpus import CollectionStore
from shared.models import LLM_ID, llm_dir
from shared.schemas import Document
from tests.conftest import make_settings, start_stack

pytestmark = pytest.mark.slow

QUERY = "Who painted the Mona Lisa?"


@dataclass
class FmStack:
    fmindex_url: str
    orchestrator_url: str
    docs: dict[str, Document]


@pytest.fixture(scope="module")
def fm_stack(
    built_data_dir: Path, wiki_sample: list[Document], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FmStack]:
    from transformers import AutoTokenizer

    settings = make_settings(built_data_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir(settings))
    # The same documents the index service's ``wiki`` collection holds, so fusion shares ids.
    CollectionStore(built_data_dir / "fmindex").build(
        "wiki", wiki_sample, tokenizer, tokenizer_id=LLM_ID
    )
    with start_stack(
        built_data_dir,
        tmp_path_factory.mktemp("fmindex-logs"),
        services=["fmindex"],
        LODESTAR_DOWNSTREAM_TIMEOUT_S="300",
        LODESTAR_REQUEST_TIMEOUT_S="300",
        # Small beams keep the test quick on a shared 2-core machine; SEAL's defaults are 15/10.
        LODESTAR_FMINDEX_BEAM="4",
        LODESTAR_FMINDEX_LENGTH="4",
        LODESTAR_FMINDEX_TITLE_LENGTH="10",
        LODESTAR_FMINDEX_THREADS="1",
        LODESTAR_FMINDEX_GENERATOR="base",
    ) as stack:
        yield FmStack(
            fmindex_url=stack.urls["fmindex"],
            orchestrator_url=stack.orchestrator_url,
            docs={d.id: d for d in wiki_sample},
        )


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=600)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_search_returns_explainable_hits_whose_ngrams_occur_in_them(fm_stack: FmStack) -> None:
    response = post(
        f"{fm_stack.fmindex_url}/search",
        {"query": QUERY, "collection": "wiki", "k": 5, "retrievers": ["fm"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["results"]) == {"fm"}
    hits = body["results"]["fm"]
    assert 1 <= len(hits) <= 5
    assert "Mona Lisa" in [h["doc_id"] for h in hits]
    assert [h["sources"]["fm"]["rank"] for h in hits] == list(range(1, len(hits) + 1))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        doc = fm_stack.docs[hit["doc_id"]]
        assert hit["ngrams"], "a hit without the n-grams that retrieved it"
        # The score is exactly the sum of what each matched n-gram contributed.
        assert sum(n["contribution"] for n in hit["ngrams"]) == pytest.approx(
            hit["score"], abs=1e-3
        )
        for ngram in hit["ngrams"]:
            assert ngram["frequency"] >= 1 and ngram["weight"] > 0
            assert 0 < ngram["contribution"] <= ngram["weight"] + 1e-6
            text = ngram["ngram"].replace("<|endoftext|>", "").replace("<file_sep>", "")
            assert flat(text) in flat(f"{doc.title} {doc.text}"), ngram
    timings = body["timings_ms"]
    assert timings["decode_ms"] > 0 and timings["index_ms"] > 0
    assert body["forward_passes"] >= 2


def test_ranking_knobs_and_typed_errors(fm_stack: FmStack) -> None:
    url = f"{fm_stack.fmindex_url}/search"
    diverse = post(
        url,
        {
            "query": QUERY,
            "collection": "wiki",
            "k": 3,
            "fm": {"beam": 4, "groups": 2, "diversity_penalty": 0.5, "decode_titles": False},
        },
    )
    assert diverse.status_code == 200, diverse.text
    assert all(n["kind"] != "title" for h in diverse.json()["results"]["fm"] for n in h["ngrams"])
    cases = [
        ({"query": QUERY, "collection": "nope"}, 404, "not_found"),
        ({"query": QUERY, "collection": "wiki", "retrievers": ["bm25"]}, 422, "validation"),
        ({"query": "   ", "collection": "wiki"}, 400, "empty"),
        ({"query": QUERY, "collection": "wiki", "k": 0}, 422, "validation"),
    ]
    for request, status, code in cases:
        response = post(url, request)
        assert response.status_code == status, (request, response.text)
        assert response.json()["error"]["code"] == code
    # groups that do not divide the beam are lowered to a divisor (the schema cannot state the
    # rule, so a schema-valid request is not refused for it)
    uneven = post(
        url, {"query": QUERY, "collection": "wiki", "k": 3, "fm": {"beam": 5, "groups": 2}}
    )
    assert uneven.status_code == 200, uneven.text
    info = httpx.get(f"{fm_stack.fmindex_url}/collections/wiki", timeout=30).json()
    assert info["documents"] == len(fm_stack.docs) and info["tokens"] > info["documents"]


def test_orchestrator_fuses_fm_with_bm25(fm_stack: FmStack) -> None:
    response = post(
        f"{fm_stack.orchestrator_url}/search",
        {"query": QUERY, "collection": "wiki", "k": 5, "retrievers": ["fm", "bm25"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] == []
    hits = body["hits"]
    assert any("fm" in h["sources"] for h in hits)
    assert any("bm25" in h["sources"] for h in hits)
    assert hits[0]["doc_id"] == "Mona Lisa"
