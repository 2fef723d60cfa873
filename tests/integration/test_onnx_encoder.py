"""The ONNX query encoder against sentence-transformers fp32 (the reference), on real text.

Congruence only: speed is measured by ``lodestar bench search``, never here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.datasets import load_collection_documents
from shared.models import Embedder, embedder_path, load_query_encoder
from shared.onnx_encoder import MANIFEST, ONNX_FILE, export_onnx, sha256_of
from tests.conftest import MODELS_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference() -> Embedder:
    return Embedder("cpu", 64)


@pytest.fixture(scope="module")
def passages() -> list[str]:
    """200 real SciFact abstracts (title + text, as indexing embeds them): long inputs that
    reach the 256-token truncation, plus the NQ-style questions the service answers."""
    docs = load_collection_documents("scifact")[:200]
    return [f"{d.title} {d.text}".strip() for d in docs] + [
        "Who painted the Mona Lisa?",
        "when was the eiffel tower built",
        "what is photosynthesis",
        "0-dimensional biomaterials show inductive properties.",
    ]


def test_onnx_vectors_match_fp32_on_real_passages(reference: Embedder, passages: list[str]) -> None:
    encoder = load_query_encoder(MODELS_DIR)
    expected = reference.encode(passages)
    got = np.concatenate([encoder.encode(passages[i : i + 16]) for i in range(0, 204, 16)])
    cosines = (expected * got).sum(axis=1)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert cosines.min() >= 0.99, cosines.min()
    assert cosines.mean() >= 0.9999, cosines.mean()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One at a time (the query path) equals in a padded batch: padding is masked out.
    alone = np.stack([encoder.encode([text])[0] for text in passages[-4:]])
    np.testing.assert_allclose(alone, got[-4:], atol=1e-5)


def test_tokens_equal_the_reference_tokenizer(reference: Embedder, passages: list[str]) -> None:
    encoder = load_query_encoder(MODELS_DIR)
    ours = encoder.tokenize(passages[:32])
    theirs = reference._model.tokenize(passages[:32])
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[name], theirs[name].numpy(), err_msg=name)
    assert ours["input_ids"].shape[1] == 256  # long abstracts truncate at max_seq_length


def test_a_corrupt_export_is_detected_and_redone(tmp_path: Path, reference: Embedder) -> None:
    models_dir = tmp_path / "models"
    directory = export_onnx(models_dir, embedder_path())
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["exporter"].startswith("torch.onnx.export")
    good = (directory / ONNX_FILE).stat().st_size
    with (directory / ONNX_FILE).open("r+b") as handle:  # flip bytes in the middle
        handle.seek(good // 2)
        handle.write(b"\x00" * 64)
    redone = export_onnx(models_dir, embedder_path())
    assert json.loads((redone / MANIFEST).read_text())["onnx_sha256"] == sha256_of(
        redone / ONNX_FILE
    )
    vector = load_query_encoder(models_dir).encode(["theory of gravitation"])[0]
    assert float(vector @ reference.encode(["theory of gravitation"])[0]) > 0.9999


def test_embedder_falls_back_to_fp32_when_the_export_cannot_load(
    tmp_path: Path, reference: Embedder
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the models directory should be")
    embedder = Embedder("cpu", 64, query_encoder="onnx", models_dir=blocked)
    assert embedder.query_backend == "torch"
    np.testing.assert_allclose(
        embedder.encode_queries(["Who painted the Mona Lisa?"]),
        reference.encode(["Who painted the Mona Lisa?"]),
        atol=1e-6,
    )


def test_embedder_serves_queries_with_onnx_by_default(reference: Embedder) -> None:
    embedder = Embedder("cpu", 64, query_encoder="onnx", models_dir=MODELS_DIR)
    assert embedder.query_backend == "onnx"
    query = ["what is photosynthesis"]
    assert float(embedder.encode_queries(query)[0] @ reference.encode(query)[0]) > 0.9999


def test_concurrent_queries_share_batches_and_keep_their_vectors(tmp_path: Path) -> None:
    """The index engine's query path under 16 concurrent callers: fewer encode calls than
    queries, and each caller's vector equals its query encoded alone."""
    from concurrent.futures import ThreadPoolExecutor

    from services.index.engine import IndexEngine

    embedder = Embedder("cpu", 64, query_encoder="onnx", models_dir=MODELS_DIR)
    engine = IndexEngine(tmp_path, lambda: embedder)
    questions = [f"who wrote the book number {i} of the series" for i in range(16)]
    embedder.encode_queries(questions[:1])  # load the session before the threads start
    alone = np.stack([embedder.encode_queries([q])[0] for q in questions])
    with ThreadPoolExecutor(16) as pool:
        together = np.stack(list(pool.map(engine.embed_query, questions)))
    np.testing.assert_allclose(together, alone, atol=1e-5)
    batcher = engine._query_batcher
    assert batcher.queries == 16 and batcher.batches < 16


def test_embed_gives_a_hit_its_stored_vector_back(built_data_dir: Path) -> None:
    # /embed serves Rocchio's judged passages: named by doc id, a shown hit gets the vector it
    # was indexed with; by text alone it is encoded on the ONNX path, close to that vector.
    from services.index.engine import IndexEngine
    from shared.models import get_embedder
    from shared.schemas import EmbedPassage, EmbedRequest
    from tests.conftest import make_settings

    settings = make_settings(built_data_dir)
    engine = IndexEngine(built_data_dir, lambda: get_embedder(settings))
    snapshot = engine.snapshot("wiki")
    rows = [0, 1, len(snapshot.passages) - 1]
    shown = [snapshot.passages[r] for r in rows]
    stored = np.asarray(snapshot.exact.embeddings[rows])
    by_text = [EmbedPassage(title=p.title, text=p.text) for p in shown]
    by_id = [EmbedPassage(title=p.title, text=p.text, doc_id=p.doc_id) for p in shown]
    edited = EmbedPassage(
        title=shown[0].title, text="A text the index never stored.", doc_id=shown[0].doc_id
    )
    query = "Who painted the Mona Lisa?"

    encoded = engine.embed(EmbedRequest(query=query, passages=by_text))
    assert ((stored * np.asarray(encoded.passage_vectors)).sum(axis=1) >= 0.99).all()
    looked_up = engine.embed(
        EmbedRequest(query=query, passages=[*by_id, edited], collection="wiki")
    )
    np.testing.assert_array_equal(np.asarray(looked_up.passage_vectors[:3], np.float32), stored)
    # A text the document does not have is encoded, not replaced by a stored passage.
    alone = engine.embed(EmbedRequest(passages=[edited.model_copy(update={"doc_id": None})]))
    np.testing.assert_allclose(looked_up.passage_vectors[3], alone.passage_vectors[0], atol=1e-5)
    for response in (encoded, looked_up):
        assert response.query_vector is not None
        np.testing.assert_allclose(
            np.asarray(response.query_vector), engine.embed_query(query), atol=1e-5
        )
