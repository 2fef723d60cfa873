"""The rewriter's pure parts: output cleaning, the on-disk cache (persistence, reload, torn
lines, other writers), the leakage guard, prompt versioning and the dataset pairs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from services.rewriter.engine import (
    PROMPTS,
    LeakageError,
    PairDocument,
    RewriteCache,
    RewritePair,
    RewriterConfig,
    RewriteRecord,
    RewriterEngine,
    clean_rewrite,
    dataset_pairs,
)
from services.rewriter.jobs import read_staged, run_rewrite_job
from shared.errors import ErrorCode, LodestarError
from tests.conftest import make_settings

ORIGINAL = "define sri"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("what is the Stanford Research Institute", "what is the Stanford Research Institute"),
        ("Rewritten query: what does SRI International do", "what does SRI International do"),
        ('"what is sri lanka"', "what is sri lanka"),
        ("**Rewritten Query:** “meaning of the honorific sri”", "meaning of the honorific sri"),
        (
            "Sure, here is the rewritten query:\n\nsri meaning in hindu names",
            "sri meaning in hindu names",
        ),
        ("1. sri as a title of respect\n2. another", "sri as a title of respect"),
        ("Query - SRI research institute   history", "SRI research institute history"),
        ("The passage discusses the honorific Sri.", "the honorific Sri."),
        ("sri honorific meaning. The user wants to know more.", "sri honorific meaning"),
    ],
)
def test_cleaning_keeps_one_query_line(raw: str, expected: str) -> None:
    assert clean_rewrite(raw, ORIGINAL) == (expected, False)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   \n\n",
        "Rewritten query:",
        '""',
        "word " * 60,
        "x" * 400,
        "the passage above",
        "The user was looking for the passage and wants to know what the user wants to know",
    ],
)
def test_cleaning_falls_back_to_the_original_when_nothing_usable(raw: str) -> None:
    assert clean_rewrite(raw, ORIGINAL) == (ORIGINAL, True)


def _record(qid: str, doc_id: str, rewrite: str) -> RewriteRecord:
    return RewriteRecord(
        qid=qid,
        original_query="q",
        doc_id=doc_id,
        rewritten_query=rewrite,
        mode="context",
        model="m",
        prompt_version="p1",
    )


def test_cache_persists_reloads_and_checks_the_input(tmp_path: Path) -> None:
    cache = RewriteCache(tmp_path, "context", "HuggingFaceTB/SmolLM2", "p1")
    cache.put(asdict(_record("1", "d1", "first")), "digest-a")
    cache.put(asdict(_record("2", "d2", "second")), "digest-b")
    assert cache.path.name == "context__HuggingFaceTB_SmolLM2__p1.jsonl"
    lines = cache.path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["record"]["rewritten_query"] == "first"

    reloaded = RewriteCache(tmp_path, "context", "HuggingFaceTB/SmolLM2", "p1")
    assert len(reloaded) == 2
    hit = reloaded.get("1", "d1", "digest-a")
    assert hit is not None and hit["rewritten_query"] == "first"
    # Same ids, another prompt input (the query or document changed): a miss, not a stale hit.
    assert reloaded.get("1", "d1", "digest-other") is None
    # The newest line of a key wins on reload.
    reloaded.put(asdict(_record("1", "d1", "regenerated")), "digest-c")
    again = RewriteCache(tmp_path, "context", "HuggingFaceTB/SmolLM2", "p1")
    assert len(again) == 2
    assert again.get("1", "d1", "digest-c") == asdict(_record("1", "d1", "regenerated"))
    # Another prompt version is another file: nothing leaks across versions.
    assert len(RewriteCache(tmp_path, "context", "HuggingFaceTB/SmolLM2", "p2")) == 0


def test_cache_survives_a_torn_last_line(tmp_path: Path) -> None:
    cache = RewriteCache(tmp_path, "context", "m", "p1")
    cache.put(asdict(_record("1", "d1", "whole")), "a")
    with cache.path.open("ab") as handle:  # a crash in the middle of an append
        handle.write(b'{"input": "b", "record": {"qid": "2", "doc')
    reloaded = RewriteCache(tmp_path, "context", "m", "p1")
    assert len(reloaded) == 1 and reloaded.get("1", "d1", "a") is not None
    reloaded.put(asdict(_record("3", "d3", "after the crash")), "c")
    final = RewriteCache(tmp_path, "context", "m", "p1")
    assert final.get("3", "d3", "c") is not None and len(final) == 2


def test_cache_sees_records_another_process_appended(tmp_path: Path) -> None:
    reader = RewriteCache(tmp_path, "context", "m", "p1")
    writer = RewriteCache(tmp_path, "context", "m", "p1")  # e.g. a worker sharing the data dir
    writer.put(asdict(_record("7", "d7", "from the worker")), "x")
    hit = reader.get("7", "d7", "x")
    assert hit is not None and hit["rewritten_query"] == "from the worker"


def _no_model() -> Any:
    raise AssertionError("the guard and validation must not load a model")


def test_leakage_guard_refuses_a_test_document_before_any_generation(tmp_path: Path) -> None:
    engine = RewriterEngine(tmp_path, _no_model)
    pairs = [
        RewritePair("1", "first query", PairDocument("train-doc", "T", "text")),
        RewritePair("2", "second query", PairDocument("test-doc", "T", "text")),
    ]
    with pytest.raises(LeakageError) as caught:
        engine.rewrite_batch(pairs, "context", forbidden_doc_ids={"test-doc"})
    assert caught.value.code == ErrorCode.validation
    assert caught.value.offending == [("2", "test-doc")]
    assert engine.llm_calls == 0 and not any(tmp_path.iterdir())


def test_bad_mode_and_missing_document_are_typed_errors(tmp_path: Path) -> None:
    engine = RewriterEngine(tmp_path, _no_model)
    with pytest.raises(LodestarError) as bad_mode:
        engine.rewrite_batch([], "sideways")
    assert bad_mode.value.code == ErrorCode.validation and bad_mode.value.field == "mode"
    with pytest.raises(LodestarError) as no_doc:
        engine.rewrite("define sri", None, "context")
    assert no_doc.value.code == ErrorCode.validation and no_doc.value.field == "document"
    with pytest.raises(LodestarError) as empty:
        engine.rewrite("   ", None, "query-only")
    assert empty.value.code == ErrorCode.empty


def test_every_prompt_is_versioned_by_mode_and_sees_only_what_its_mode_allows() -> None:
    passage = "UNIQUE-PASSAGE-MARKER text"
    for version, prompt in PROMPTS.items():
        rendered = json.dumps(prompt.build("define sri", "Title", passage))
        assert prompt.mode in version or prompt.mode == "synthetic", version
        if prompt.mode == "query-only":
            assert "UNIQUE-PASSAGE-MARKER" not in rendered  # the ablation never sees the document
        else:
            assert "UNIQUE-PASSAGE-MARKER" in rendered
    with pytest.raises(ValueError, match="not a 'context' prompt"):
        RewriterEngine(
            Path("unused"),
            _no_model,
            config=RewriterConfig(prompts={"context": "query-only-v1"}),
        )


def test_scifact_train_pairs_exclude_every_test_judged_document() -> None:
    selected = dataset_pairs("scifact", "train")
    assert selected.pairs and selected.dropped > 0
    assert not {p.document.id for p in selected.pairs} & selected.forbidden_doc_ids
    from shared.datasets import load_scifact

    test_docs = {d for docs in load_scifact().qrels["test"].values() for d in docs}
    assert selected.forbidden_doc_ids == test_docs
    with pytest.raises(LodestarError):
        dataset_pairs("msmarco", "train")


def test_staged_batches_are_read_by_name_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    for name in ("../../etc/passwd", "/etc/passwd", "x.jsonl", "0" * 32 + ".json"):
        with pytest.raises(LodestarError):
            read_staged(settings, name)
        with pytest.raises(ValueError, match="not a staged batch name"):
            run_rewrite_job(settings, "job", staged=name)


def test_a_cache_hit_makes_no_call_and_is_cleaned_again_from_the_raw_output(
    tmp_path: Path,
) -> None:
    """Query-only needs no tokenizer: with the entry in the cache no model is ever loaded."""
    engine = RewriterEngine(tmp_path, _no_model)
    prompt = PROMPTS[engine.prompt_version("query-only")]
    digest = engine._digest(prompt.build("define sri", "", ""))
    record = RewriteRecord(
        qid="q1",
        original_query="define sri",
        doc_id="d1",
        rewritten_query="an older cleaner's output",
        mode="query-only",
        model=engine.model_id,
        prompt_version=prompt.version,
    )
    raw = "Rewritten query: **meaning of the honorific sri**\nand more"
    engine.cache("query-only").put(asdict(record), digest, raw=raw)
    document = PairDocument("d1", "ignored", "ignored")
    result = engine.rewrite("define sri", document, "query-only", qid="q1")
    assert result.cached and engine.llm_calls == 0
    assert result.record.rewritten_query == "meaning of the honorific sri"
    # A batch over the same pair is free too, and another engine reloads it from disk.
    fresh = RewriterEngine(tmp_path, _no_model)
    pairs = [RewritePair("q1", "define sri", document)]
    assert fresh.rewrite_batch(pairs, "query-only") == [result.record]
    assert fresh.llm_calls == 0
