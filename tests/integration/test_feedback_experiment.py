"""``lodestar experiment feedback`` end to end on a real SciFact slice (in a temporary data dir):
all three phases, the report files, their structure and metric ranges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lodestar.experiments.feedback import FeedbackConfig, run_feedback, seeded_order
from shared.datasets import BeirDataset, load_scifact
from shared.schemas import Document
from tests.conftest import make_settings


def scifact_slice(test: int = 6, train: int = 16, distractors: int = 40) -> BeirDataset:
    """``test`` test claims and ``train`` train claims with their relevant abstracts plus
    ``distractors`` other abstracts, each cut to its first 60 words (embedding and training stay
    seconds on two cores)."""
    beir = load_scifact()
    test_qrels = dict(sorted(beir.qrels["test"].items())[:test])
    train_qrels = dict(sorted(beir.qrels["train"].items())[:train])
    wanted = {d for qrels in (test_qrels, train_qrels) for docs in qrels.values() for d in docs}
    corpus = [d for d in beir.corpus if d.id in wanted]
    corpus += [d for d in beir.corpus if d.id not in wanted][:distractors]
    cut = [Document(id=d.id, title=d.title, text=" ".join(d.text.split()[:60])) for d in corpus]
    ids = {d.id for d in cut}
    queries = {q: beir.queries[q] for q in (*test_qrels, *train_qrels)}
    return BeirDataset(
        name="scifact-slice",
        corpus=cut,
        queries=queries,
        qrels={
            "test": {q: {d: r for d, r in v.items() if d in ids} for q, v in test_qrels.items()},
            "train": {q: {d: r for d, r in v.items() if d in ids} for q, v in train_qrels.items()},
        },
    )


@pytest.mark.slow
def test_feedback_experiment_end_to_end(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", device="cpu")
    dataset = scifact_slice()
    config = FeedbackConfig(
        feedback_depth=2,  # a 60-document corpus: judging the top 10 would leave no residual
        sweep_queries=8,
        prf_docs=(3,),
        shadow_queries=3,
        llm_queries=2,
        calibrate_queries=2,
        agents=("cross-encoder", "llm", "both"),
        offline_sizes=(5, 14),
        offline_test_limit=4,
        steps=2,
        batch_size=4,
        negatives=2,
        max_length=64,
        collection="eval-scifact-slice",
    )
    out = tmp_path / "out"
    result = run_feedback(settings, config, out, dataset=dataset)

    for name in ("feedback.json", "feedback.md", "feedback.png", "feedback_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "feedback.json").read_text())["experiment"] == "feedback"
    report = (out / "feedback.md").read_text()
    assert "## Online" in report and "## Shadow" in report and "## Offline" in report

    online = result["online"]
    assert online["queries"] == 6
    assert set(online["residual_ndcg@10"]) >= {"first", "user:tuned", "prf:top3"}
    for values in (online["residual_ndcg@10"], online["full_ndcg@10"]):
        assert all(0.0 <= v <= 1.0 for v in values.values())
    # Residual evaluation: the same queries for every ranking, none with a judged document.
    per_query = online["per_query_residual"]
    assert len({frozenset(v) for v in per_query.values()}) == 1
    assert all(len(j) == 2 for j in online["judged"].values())
    sweep = online["sweep"]
    assert sweep is not None, "no sweep query kept a relevant document beyond the judged two"
    assert len(sweep["grid"]) == 28 and sweep["queries"] == 8  # defaults + 15 + 12
    assert sweep["chosen_residual_ndcg@10"] == max(r["residual_ndcg@10"] for r in sweep["grid"])
    assert online["weights"]["tuned"] == sweep["chosen"]
    assert isinstance(online["target_met"], bool)

    offline = result["offline"]
    assert [r["n"] for r in offline["runs"]] == [5, 14]
    largest = offline["runs"][-1]
    assert largest["positive_labels"] >= 8 and "error" not in largest
    assert largest["update"]["published"] in (True, False)
    assert 0.0 <= largest["test_ndcg@10"]["before"] <= 1.0
    assert 0.0 <= largest["test_ndcg@10"]["after"] <= 1.0
    if not largest["update"]["published"]:  # a refused model is not served
        assert largest["test_ndcg@10"]["after"] == largest["test_ndcg@10"]["before"]
    # the served model of the data dir is untouched (the update ran in a scratch directory)
    assert not (settings.data_dir / "models" / "cross-encoder").exists()

    shadow = result["shadow"]
    assert shadow["queries"] == 3
    assert shadow["results"]["llm@default"]["queries"] == 2
    assert "llm@default" in shadow["results"] and "llm@calibrated" in shadow["results"]
    expected = {"llm"} | ({"cross-encoder", "both"} if largest["update"]["published"] else set())
    assert {e["agent"] for e in shadow["results"].values()} == expected
    for entry in shadow["results"].values():
        assert -1.0 <= entry["kappa"] <= 1.0
        assert entry["queries"] == (2 if entry["agent"] in ("llm", "both") else 3)
        assert entry["n"] == 2 * entry["queries"]
        values = entry["residual_ndcg@10"].values()
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
        assert (entry["gain"] is None) == (entry["residual_queries"] == 0)
        assert 0.05 <= entry["threshold"] <= 0.95


@pytest.mark.slow
def test_offline_warm_start_updates_the_served_model(tmp_path: Path) -> None:
    """``warm_start``: the update starts from the served cross-encoder, the test "before" is that
    model's ranking, the queries it was trained on give no feedback, and the data dir's served
    version is left as it was."""
    from services.reranker.cross_encoder import (
        CrossEncoderTrainConfig,
        RankingExample,
        TextDoc,
        cross_encoder_family,
        publish_cross_encoder,
        train_cross_encoder,
    )

    settings = make_settings(tmp_path / "data", device="cpu")
    dataset = scifact_slice(test=4, train=24)
    corpus = {d.id: d for d in dataset.corpus}
    trained_on = sorted(dataset.qrels["train"])[:4]
    negatives = tuple(TextDoc(d.id, d.title, d.text) for d in dataset.corpus[-2:])
    examples = [
        RankingExample(
            q, dataset.queries[q], TextDoc(d, corpus[d].title, corpus[d].text), negatives
        )
        for q in trained_on
        for d in list(dataset.qrels["train"][q])[:1]
    ]
    start = publish_cross_encoder(
        settings,
        train_cross_encoder(
            examples, CrossEncoderTrainConfig(steps=2, batch_size=2, max_length=64)
        ),
        {"train_qids": trained_on},
    )
    config = FeedbackConfig(
        phases=("offline",),
        calibrate_queries=2,  # the back of the train order; the rest is offline feedback
        feedback_depth=2,
        offline_sizes=(18,),
        offline_test_limit=4,
        steps=2,
        batch_size=4,
        negatives=2,
        max_length=64,
        warm_start=True,
        collection="eval-scifact-slice",
    )
    offline = run_feedback(settings, config, tmp_path / "out", dataset=dataset)["offline"]

    assert offline["start"]["version"] == start["version"]
    calibration = seeded_order(sorted(dataset.qrels["train"]), config.seed, "train")[-2:]
    assert offline["start"]["train_queries_left_out"] == len(set(trained_on) - set(calibration))
    run = offline["runs"][0]
    assert "error" not in run, run
    assert run["rel_labels"] > 0
    if not run["update"]["published"]:  # the start model keeps serving
        assert run["served"] == "start model (not published)"
        assert run["test_ndcg@10"]["after"] == run["test_ndcg@10"]["before"]
    assert cross_encoder_family(settings).current_version() == start["version"]
