"""The ONNX Runtime variants of ``lodestar bench cross-encoder`` score what the torch model
scores: fp32 to float error, int8 close enough to keep the order of clearly different pairs."""

from __future__ import annotations

from pathlib import Path

from lodestar.bench.cross_encoder import OnnxCrossEncoder
from services.reranker.cross_encoder import TextDoc, TrainedCrossEncoder, load_cross_encoder
from shared.datasets import load_scifact


def test_onnx_cross_encoder_matches_torch(tmp_path: Path) -> None:
    body = load_cross_encoder()
    model = TrainedCrossEncoder(body.model, 64)
    dataset = load_scifact()
    qid, judged = sorted(dataset.qrels["test"].items())[0]
    corpus = {d.id: d for d in dataset.corpus}
    docs = [TextDoc(d, corpus[d].title, corpus[d].text) for d in judged]
    docs += [TextDoc(d.id, d.title, d.text) for d in dataset.corpus[:5]]
    query = dataset.queries[qid]

    expected = model.score(query, docs)
    onnx = OnnxCrossEncoder(model, tmp_path).score(query, docs, batch_size=4)
    assert max(abs(a - b) for a, b in zip(expected, onnx, strict=True)) < 1e-3

    int8 = OnnxCrossEncoder(model, tmp_path, int8=True).score(query, docs)
    assert len(int8) == len(docs)
    assert max(abs(a - b) for a, b in zip(expected, int8, strict=True)) < 0.5
