"""The offline update's split, held-out evaluation and publish-only-if-better decision.

Training is replaced by fixed scorers here (the real trainer runs in the integration test):
what is under test is which figures are compared and what gets published."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.reranker import offline_update as ou
from services.reranker.cross_encoder import (
    EXAMPLES_FILE,
    RankingExample,
    TextDoc,
    cross_encoder_family,
    read_examples,
    write_examples,
)
from shared.settings import Settings

#: 24 queries, 6 held out at the default fraction: enough for the publish gate's test (the
#: smallest one-sided p over m held-out queries is 2^-m).
QUERIES = [f"query {i}" for i in range(24)]


def label_rows(relevant_rank: int = 1) -> list[dict[str, Any]]:
    """Per query: docs q<i>-1..5 ranked 1..5, the one at ``relevant_rank`` labelled relevant."""
    rows = []
    for i, query in enumerate(QUERIES):
        docs = [f"q{i}-{r}" for r in range(1, 6)]
        positive = docs[relevant_rank - 1]
        negatives = [d for d in docs if d != positive]
        rows.append(
            {
                "type": "rel_label",
                "query": query,
                "collection": "wiki",
                "doc_id": positive,
                "label": 1,
                "rank": relevant_rank,
                "hard_negatives": negatives,
                "negative_ranks": [docs.index(d) + 1 for d in negatives],
                "source": "user",
                "weight": 1.0,
                "created_at": float(i),
                "derived_from": [f"fb{i}"],
            }
        )
    return rows


def texts(collection: str, ids: Sequence[str]) -> dict[str, TextDoc]:
    assert collection == "wiki"
    return {d: TextDoc(d, d, f"text of {d}") for d in ids}


class FakeModel:
    """Scores by a rule: ``oracle`` puts each query's labelled document first."""

    def __init__(self, positives: set[str], *, oracle: bool, version: str | None = None):
        self.positives = positives
        self.oracle = oracle
        self.version = version
        self.losses: list[float] = []
        self.max_length = 32

    def score(self, query: str, documents: Sequence[Any]) -> list[float]:
        hit = [1.0 if d.doc_id in self.positives else 0.0 for d in documents]
        return hit if self.oracle else [-h for h in hit]


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def publish(settings: Settings, trained: Any, manifest: dict[str, Any]) -> dict[str, Any]:
        calls.append(manifest)
        return {**manifest, "version": "v-new"}

    monkeypatch.setattr(ou, "publish_cross_encoder", publish)
    return calls


def run_with_models(
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
    *,
    relevant_rank: int,
    current: str,
    trained: str,
) -> dict[str, Any]:
    """``run_offline_update`` over ``label_rows(relevant_rank)`` with fixed scorers for models.
    ``current``: the serving model (``none``: nothing published); ``trained``: what training
    yields. ``oracle`` ranks each labelled document first, ``inverse`` last."""
    rows = label_rows(relevant_rank=relevant_rank)
    settings = Settings(data_dir=data_dir)
    positives = {r["doc_id"] for r in rows}
    models = {
        "oracle": FakeModel(positives, oracle=True, version="v-old"),
        "inverse": FakeModel(positives, oracle=False, version="v-old"),
    }
    if current != "none":
        family = cross_encoder_family(settings)
        family.root.mkdir(parents=True)
        (family.root / "CURRENT").write_text("v-old\n")
    monkeypatch.setattr(
        ou, "_current_model", lambda settings, version: None if version is None else models[current]
    )
    monkeypatch.setattr(ou, "train_cross_encoder", lambda *args, **kwargs: models[trained])
    return ou.run_offline_update(settings, rows, texts, ou.OfflineUpdateConfig(min_examples=4))


def test_should_publish_only_strictly_better() -> None:
    assert ou.should_publish(0.5, 0.6)
    assert not ou.should_publish(0.5, 0.5)
    assert not ou.should_publish(0.6, 0.5)
    assert not ou.should_publish(0.5, 0.55, min_gain=0.05)
    assert ou.should_publish(0.5, 0.56, min_gain=0.05)
    assert not ou.should_publish(0.5, 0.6, p_value=0.2, max_p=0.05)
    assert ou.should_publish(0.5, 0.6, p_value=0.05, max_p=0.05)


def test_a_mean_gain_the_held_out_queries_do_not_support_is_not_significant() -> None:
    before = {"a": 0.5, "b": 0.5, "c": 0.5}
    # One query much better, two a little worse: the mean rises by 0.117, but half of the
    # eight sign assignments of (0.5, -0.1, -0.05) reach that sum.
    assert ou.held_out_p_value(before, {"a": 1.0, "b": 0.4, "c": 0.45}) == pytest.approx(0.5)
    every = {k: 0.9 for k in before}
    assert ou.held_out_p_value(before, every) == pytest.approx(1 / 8)
    assert ou.held_out_p_value({"a": 0.5}, {"a": 1.0}) == 1.0  # one query is no evidence


def test_split_is_deterministic_by_query_and_keeps_both_sides() -> None:
    train, held = ou.split_queries(QUERIES, 0.25, seed=3)
    assert len(held) == 6 and len(train) == 18 and not train & held
    assert ou.split_queries(list(reversed(QUERIES)), 0.25, seed=3) == (train, held)
    assert ou.split_queries(QUERIES, 0.25, seed=4) != (train, held)
    assert len(ou.split_queries(QUERIES[:2], 0.9, seed=0)[0]) == 1  # never all held out
    with pytest.raises(ou.InsufficientFeedback):
        ou.split_queries([ou.query_key(q) for q in ("Only one", " only  ONE")], 0.5, seed=0)


def test_held_out_figures_first_stage_and_models() -> None:
    rows = label_rows(relevant_rank=1)
    keys = {ou.query_key(q) for q in QUERIES}
    sets = ou.held_out_sets(rows, keys)
    documents = texts("wiki", [d for r in rows for d in [r["doc_id"], *r["hard_negatives"]]])
    first_stage, _ = ou.evaluate_held_out(None, sets, documents)
    assert first_stage == pytest.approx(1.0)
    positives = {r["doc_id"] for r in rows}
    inverse = FakeModel(positives, oracle=False)
    worst, per_query = ou.evaluate_held_out(lambda q, d: inverse.score(q, d), sets, documents)
    assert worst == pytest.approx(1 / math.log2(6))  # relevant at rank 5 of 5
    assert set(per_query) == keys


def test_a_user_label_wins_over_a_shadow_label_on_held_out() -> None:
    rows = label_rows()[:1]
    shadow = {**rows[0], "source": "shadow", "label": 0, "created_at": 99.0}
    sets = ou.held_out_sets([rows[0], shadow], {ou.query_key(QUERIES[0])})
    assert sets[ou.query_key(QUERIES[0])].qrels()[rows[0]["doc_id"]] == 1


def test_a_worse_model_is_not_published(
    monkeypatch: pytest.MonkeyPatch, published: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The first stage is already perfect.
    result = run_with_models(
        monkeypatch, tmp_path, relevant_rank=1, current="none", trained="inverse"
    )
    assert not result["published"] and result["outcome"] == "rejected"
    assert result["before"]["ndcg@10"] == pytest.approx(1.0)
    assert result["before"]["model"] == "first-stage-order"
    assert result["after"]["ndcg@10"] < result["before"]["ndcg@10"]
    assert result["version"] is None
    assert published == []
    assert result["examples"]["held_out_queries"] == 6
    assert result["examples"]["train_examples"] == 18


def test_a_tie_is_not_published_either(
    monkeypatch: pytest.MonkeyPatch, published: list[dict[str, Any]], tmp_path: Path
) -> None:
    result = run_with_models(
        monkeypatch, tmp_path, relevant_rank=1, current="none", trained="oracle"
    )
    assert result["before"]["ndcg@10"] == result["after"]["ndcg@10"] == pytest.approx(1.0)
    assert not result["published"] and published == []


def test_a_better_model_is_published_with_both_figures(
    monkeypatch: pytest.MonkeyPatch, published: list[dict[str, Any]], tmp_path: Path
) -> None:
    result = run_with_models(
        monkeypatch, tmp_path, relevant_rank=5, current="inverse", trained="oracle"
    )
    assert result["published"] and result["version"] == "v-new"
    assert result["before"]["model"] == "cross-encoder:v-old"
    assert result["after"]["ndcg@10"] == pytest.approx(1.0)
    assert result["before"]["ndcg@10"] == pytest.approx(1 / math.log2(6))
    (manifest,) = published
    assert manifest["trained_on"] == "feedback"
    assert manifest["offline_update"]["after"]["ndcg@10"] == pytest.approx(1.0)


def test_too_few_examples_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ou.InsufficientFeedback, match="min_examples=30"):
        ou.run_offline_update(
            Settings(data_dir=tmp_path),
            label_rows(),
            texts,
            ou.OfflineUpdateConfig(min_examples=30),
        )


def test_car_queries_train_on_rewrites_of_the_labelled_queries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rows = label_rows(relevant_rank=1)
    seen: list[list[tuple[str, str, str]]] = []
    trained_on: list[list[RankingExample]] = []

    def rewrite(items: Sequence[tuple[str, str, TextDoc]]) -> list[str]:
        seen.append([(key, query, doc.doc_id) for key, query, doc in items])
        return [f"{query} about {doc.doc_id}" for _, query, doc in items]

    def train(examples: list[RankingExample], *args: Any, **kwargs: Any) -> FakeModel:
        trained_on.append(examples)
        return FakeModel({r["doc_id"] for r in rows}, oracle=True)

    monkeypatch.setattr(ou, "train_cross_encoder", train)
    settings = Settings(data_dir=tmp_path)
    config = ou.OfflineUpdateConfig(min_examples=4, queries="original+car")
    result = ou.run_offline_update(settings, rows, texts, config, rewrite=rewrite)
    # Each training query is rewritten once, with the document its label marked relevant.
    assert all(doc.startswith(f"q{QUERIES.index(query)}-") for _, query, doc in seen[0])
    originals = [e for e in trained_on[0] if e.source == "feedback:user"]
    rewrites = [e for e in trained_on[0] if e.source == "feedback:user+car"]
    assert len(originals) == len(rewrites) == len(seen[0]) == result["examples"]["train_queries"]
    assert {e.query for e in rewrites} == {
        f"{e.query} about {e.positive.doc_id}" for e in originals
    }
    assert result["examples"]["queries"] == "original+car"
    car_only = ou.with_rewrites(originals, "car", rewrite)
    assert [e.query for e in car_only] == [e.query for e in rewrites]
    assert ou.with_rewrites(originals, "original", None) == originals
    with pytest.raises(ValueError, match="needs a rewriter"):
        ou.with_rewrites(originals, "car", None)
    with pytest.raises(ValueError, match="queries must be"):
        ou.OfflineUpdateConfig(queries="paraphrase")


def test_the_api_offers_exactly_the_update_query_modes() -> None:
    from typing import get_args

    from services.orchestrator.feedback_api import OfflineUpdateRequest

    assert get_args(OfflineUpdateRequest.model_fields["queries"].annotation) == ou.QUERY_MODES


def test_a_better_mean_without_evidence_is_refused(
    monkeypatch: pytest.MonkeyPatch, published: list[dict[str, Any]], tmp_path: Path
) -> None:
    rows = label_rows(relevant_rank=5)
    positives = {r["doc_id"] for r in rows}
    monkeypatch.setattr(
        ou, "train_cross_encoder", lambda *a, **k: FakeModel(positives, oracle=True)
    )
    settings = Settings(data_dir=tmp_path)
    strict = ou.OfflineUpdateConfig(min_examples=4, max_p=0.01)
    result = ou.run_offline_update(settings, rows, texts, strict)
    # Every one of the 6 held-out queries improves: p = 2^-6, above this gate's 0.01.
    assert result["after"]["ndcg@10"] > result["before"]["ndcg@10"]
    assert result["p_value"] == pytest.approx(1 / 64)
    assert not result["published"] and published == []
    assert "not significant at max_p = 0.01" in result["reason"]
    assert result["gate"] == {"min_gain": 0.0, "max_p": 0.01}
    with pytest.raises(ValueError, match="max_p"):
        ou.OfflineUpdateConfig(max_p=0.0)


def test_replay_mixes_in_the_serving_versions_training_examples(
    monkeypatch: pytest.MonkeyPatch, published: list[dict[str, Any]], tmp_path: Path
) -> None:
    rows = label_rows(relevant_rank=5)
    settings = Settings(data_dir=tmp_path)
    family = cross_encoder_family(settings)
    (family.versions_dir / "v-old").mkdir(parents=True)
    (family.root / "CURRENT").write_text("v-old\n")
    old = [
        RankingExample(
            f"t{i}",
            f"old query {i}",
            TextDoc(f"p{i}", "", "pos"),
            (TextDoc(f"n{i}", "", "neg"),),
            source="car",
        )
        for i in range(12)
    ]
    write_examples(family.versions_dir / "v-old" / EXAMPLES_FILE, old)
    assert read_examples(settings, "v-old") == old
    positives = {r["doc_id"] for r in rows}
    trained_on: list[list[RankingExample]] = []

    def train(examples: list[RankingExample], *args: Any, **kwargs: Any) -> FakeModel:
        trained_on.append(examples)
        return FakeModel(positives, oracle=True)

    monkeypatch.setattr(ou, "_current_model", lambda s, v: FakeModel(positives, oracle=False))
    monkeypatch.setattr(ou, "train_cross_encoder", train)
    config = ou.OfflineUpdateConfig(min_examples=4, replay=0.5)
    result = ou.run_offline_update(settings, rows, texts, config)
    (examples,) = trained_on
    replayed = [e for e in examples if e.source == "car"]
    assert result["examples"]["train_examples"] == 18 and result["examples"]["replayed"] == 9
    assert len(examples) == 27 and len(replayed) == 9 and set(replayed) <= set(old)
    # More asked for than there are: all of them, once.
    more = ou.replay_examples(settings, "v-old", 50, seed=1)
    assert sorted(e.qid for e in more) == sorted(e.qid for e in old)
    assert ou.replay_examples(settings, None, 5, seed=1) == []


def test_the_api_and_the_worker_default_to_the_update_configs_defaults() -> None:
    import inspect

    from services.orchestrator.feedback_api import OfflineUpdateRequest
    from services.worker.offline_update import run_offline_update_job

    config = ou.OfflineUpdateConfig()
    job = inspect.signature(run_offline_update_job).parameters
    for name in ("min_examples", "eval_fraction", "min_gain", "max_p", "replay", "queries"):
        assert OfflineUpdateRequest.model_fields[name].default == getattr(config, name), name
        assert job[name].default == getattr(config, name), name
