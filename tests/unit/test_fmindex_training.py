"""SEAL's training pairs: 10-token spans cut from the indexed tokenisation, favouring spans that
overlap the query; titles end with the title marker; pseudo-queries cover unjudged passages."""

from __future__ import annotations

import random

import pytest

from services.fmindex.corpus import BODY_MARKER, TITLE_MARKER, Markers, encode_text
from services.fmindex.training import PairConfig, build_pairs, sample_spans
from shared.schemas import Document
from tests.conftest import MODELS_DIR


def test_spans_favour_query_overlap() -> None:
    body = list(range(100))
    flags = [40 <= i < 50 for i in range(100)]
    rng = random.Random(0)
    hits = 0
    for _ in range(200):
        (span,) = sample_spans(body, flags, 1, 10, 1.0, rng)
        assert len(span) == 10 and span == tuple(range(span[0], span[0] + 10))
        hits += 40 in span or 49 in span
    # 19 of 91 start positions touch the overlapping region; weighting makes them the majority.
    assert hits > 120
    assert sample_spans([1, 2], [False, False], 3, 10, 1.0, rng) == [(1, 2)]
    assert len(set(sample_spans(body, flags, 10, 10, 1.0, rng))) == 10


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from transformers import AutoTokenizer

    from shared.models import LLM_DIRNAME

    return AutoTokenizer.from_pretrained(MODELS_DIR / LLM_DIRNAME)


def test_pairs_follow_the_recipe(tokenizer: object) -> None:
    corpus = [
        Document(
            id="d1",
            title="Aspirin and stroke",
            text="Aspirin lowers the risk of stroke in adults. " * 3,
        ),
        Document(
            id="d2",
            title="Coffee",
            text="Coffee drinkers sleep less than other adults in every study. "
            "Caffeine blocks adenosine receptors in the brain and keeps people awake at night. "
            "Decaffeinated coffee has no measurable effect on the sleep of healthy volunteers.",
        ),
    ]
    queries = {"q1": "Aspirin reduces stroke risk"}
    qrels = {"q1": {"d1": 1}}
    examples = build_pairs(tokenizer, corpus, queries, qrels, PairConfig(seed=1))
    kinds = [e.kind for e in examples]
    assert kinds.count("body") == 10 and kinds.count("title") == 3
    assert kinds.count("pseudo-body") == 3 and kinds.count("pseudo-title") == 1
    d1_body = encode_text(tokenizer, corpus[0].text)
    title_eos = Markers(tokenizer).title_eos
    for example in examples:
        if example.kind == "body":
            assert example.source == "Aspirin reduces stroke risk" + BODY_MARKER
            assert len(example.target) == 10
            assert any(tuple(d1_body[i : i + 10]) == example.target for i in range(len(d1_body)))
        if example.kind.endswith("title"):
            assert example.source.endswith(TITLE_MARKER) and example.target[-1] == title_eos
