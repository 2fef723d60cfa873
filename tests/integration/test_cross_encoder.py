"""The CAR cross-encoder: training on a tiny real set, publish, serve, hot reload, leakage guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.reranker.cross_encoder import (
    CrossEncoderTrainConfig,
    CurrentCrossEncoder,
    LeakageError,
    RankingExample,
    TextDoc,
    check_no_leakage,
    cross_encoder_family,
    mine_hard_negatives,
    publish_cross_encoder,
    read_examples,
    train_cross_encoder,
)
from services.reranker.engine import RerankDocument, RerankerEngine
from shared.errors import LodestarError
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

TOPICS = {
    "volcano": "Volcanoes erupt molten lava, ash and gas from magma chambers below the crust.",
    "violin": "The violin is a bowed string instrument with four strings tuned in fifths.",
    "penicillin": "Penicillin is an antibiotic that kills bacteria by blocking cell wall growth.",
    "glacier": "A glacier is a slowly moving mass of ice formed from compacted snow.",
    "sonnet": "A sonnet is a fourteen-line poem written in iambic pentameter with a rhyme.",
    "enzyme": "Enzymes are proteins that speed up chemical reactions in living cells.",
}
QUERIES = {
    "volcano": "what comes out when a volcano erupts",
    "violin": "how many strings does a violin have",
    "penicillin": "how does penicillin kill bacteria",
    "glacier": "what is a glacier made of",
    "sonnet": "how many lines in a sonnet",
    "enzyme": "what do enzymes do in cells",
}


def docs() -> dict[str, TextDoc]:
    return {name: TextDoc(name, name.title(), text) for name, text in TOPICS.items()}


def examples() -> list[RankingExample]:
    corpus = docs()
    return [
        RankingExample(
            qid=name,
            query=QUERIES[name],
            positive=corpus[name],
            negatives=tuple(d for other, d in corpus.items() if other != name),
        )
        for name in TOPICS
    ]


def test_hard_negatives_skip_judged_documents() -> None:
    ranking = ["d1", "rel", "d2", "d3", "d4"]
    assert mine_hard_negatives(ranking, {"rel"}, 2) == ["d1", "d2"]
    assert mine_hard_negatives(ranking, {"rel"}, 2, skip=1) == ["d2", "d3"]


def test_leakage_guard_refuses_test_queries_and_test_judged_documents() -> None:
    data = examples()
    check_no_leakage(data, forbidden_qids={"other"}, forbidden_doc_ids={"nothing"})
    with pytest.raises(LeakageError, match="test query"):
        check_no_leakage(data, forbidden_qids={"violin"})
    with pytest.raises(LeakageError, match="test-judged document 'glacier'"):
        check_no_leakage(data, forbidden_doc_ids={"glacier"})


@pytest.mark.parametrize("loss", ["pointwise", "listwise"])
def test_training_lowers_the_loss_and_ranks_positives_first(loss: str) -> None:
    config = CrossEncoderTrainConfig(
        steps=40, batch_size=3, negatives_per_query=3, loss=loss, learning_rate=1e-4, max_length=64
    )  # type: ignore[arg-type]
    trained = train_cross_encoder(examples(), config)
    assert len(trained.losses) == 40
    first, last = sum(trained.losses[:8]) / 8, sum(trained.losses[-8:]) / 8
    assert last < 0.6 * first
    corpus = list(docs().values())
    for name, query in QUERIES.items():
        scores = trained.score(query, corpus)
        best = corpus[max(range(len(corpus)), key=lambda i: scores[i])]
        assert best.doc_id == name, (query, scores)


def test_published_versions_are_served_and_reloaded_without_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    current = CurrentCrossEncoder(settings)
    engine = RerankerEngine(
        lambda: pytest.fail("no LLM needed"),  # type: ignore[arg-type, return-value]
        lambda: pytest.fail("no embedder needed"),  # type: ignore[arg-type, return-value]
        cross_encoder=current.get,
    )
    documents = [RerankDocument(d.doc_id, d.title, d.text) for d in docs().values()]
    with pytest.raises(LodestarError) as missing:
        engine.rerank(QUERIES["sonnet"], documents, "cross-encoder")
    assert missing.value.code.value == "unavailable"
    assert not engine.cross_encoder_trained

    config = CrossEncoderTrainConfig(steps=30, batch_size=3, learning_rate=1e-4, max_length=64)
    first = publish_cross_encoder(settings, train_cross_encoder(examples(), config), {"n": 1})
    outcome = engine.rerank(QUERIES["sonnet"], documents, "cross-encoder")
    assert outcome.details["model"] == f"cross-encoder:{first['version']}"
    assert documents[outcome.ranking()[0]].doc_id == "sonnet"

    # A second publish (a different model) is picked up by the same engine on its next call.
    other = CrossEncoderTrainConfig(steps=2, batch_size=1, learning_rate=1e-6, max_length=64)
    second = publish_cross_encoder(settings, train_cross_encoder(examples(), other), {"n": 2})
    assert second["version"] != first["version"]
    again = engine.rerank(QUERIES["sonnet"], documents, "cross-encoder")
    assert again.details["model"] == f"cross-encoder:{second['version']}"
    assert again.scores != outcome.scores
    assert cross_encoder_family(settings).read_manifest()["n"] == 2
    cross_encoder_family(settings).verify()
    # Each version keeps what it was trained on, for a later offline update to replay.
    kept = read_examples(settings, first["version"])
    assert kept == [e for e in examples() if e.negatives] and first["replay_examples"] == len(kept)
