"""``lodestar bench cross-encoder``: re-ranking 50 candidates with the cross-encoder on one core.

Variants, each timed on the same SciFact claims and their BM25 top 50 in the same run: fp32 at
several input lengths, int8 dynamic quantisation of the linear layers (``torch.ao``) at the
serving length, and the same model exported to ONNX and run by ONNX Runtime on one thread, fp32
and dynamic int8 (the query encoder's road, ``shared/onnx_encoder.py``). Quality is held to the fp32 model by the overlap of the two top-10s and by
nDCG@10 on the same claims. The model is the published one (``lodestar rerank status``), else the
untrained MiniLM body (latency does not depend on the weights; the quality columns then mean
nothing, and the JSON says so). The baseline is the fp32 model at the serving length.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.settings import Settings, get_settings

DEFAULT_OUT = Path("benchmarks/results/cross_encoder_latency.json")
CANDIDATES = 50


def _quantised(trained: Any) -> Any:
    import torch

    from services.reranker.cross_encoder import TrainedCrossEncoder

    model = copy.deepcopy(trained.model)
    model.model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        model.model, {torch.nn.Linear}, dtype=torch.qint8
    )
    return TrainedCrossEncoder(model, trained.max_length, version=trained.version)


class OnnxCrossEncoder:
    """The cross-encoder exported to one ONNX graph (TorchScript exporter, inputs by keyword),
    scored by ONNX Runtime on one thread with the model's own tokenizer: the same pairs, the same
    truncation, the same logits up to float error."""

    def __init__(self, trained: Any, directory: Path, *, int8: bool = False) -> None:
        import onnxruntime as ort
        import torch

        from shared.onnx_encoder import INPUT_NAMES, OPSET

        self.max_length = trained.max_length
        self.tokenizer = trained.model.tokenizer
        body = trained.model.model.eval()

        class Logit(torch.nn.Module):
            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                ).logits.squeeze(-1)

        path = directory / "cross-encoder.onnx"
        example = self._encode("a query", ["a document"])
        with torch.inference_mode():
            torch.onnx.export(
                Logit(body),
                tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES),
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=["logit"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in INPUT_NAMES}
                | {"logit": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantised = directory / "cross-encoder.int8.onnx"
            quantize_dynamic(str(path), str(quantised), weight_type=QuantType.QInt8)
            path = quantised
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _encode(self, query: str, texts: list[str]) -> dict[str, Any]:
        batch = self.tokenizer(
            [query] * len(texts),
            texts,
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="np",
        )
        from shared.onnx_encoder import INPUT_NAMES

        return {n: batch[n].astype("int64") for n in INPUT_NAMES}

    def score(self, query: str, documents: list[Any], *, batch_size: int = 32) -> list[float]:
        texts = [d.as_text() for d in documents]
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            (logits,) = self.session.run(
                None, self._encode(query, texts[start : start + batch_size])
            )
            out.extend(float(v) for v in logits.reshape(-1))
        return out


def run(settings: Settings, queries: int, lengths: list[int], out: Path) -> dict[str, Any]:
    import bm25s
    import Stemmer
    import torch

    from lodestar.evaluation.common import provenance, write_json
    from services.reranker.cross_encoder import (
        CrossEncoderNotTrained,
        CurrentCrossEncoder,
        TextDoc,
        TrainedCrossEncoder,
        load_cross_encoder,
    )
    from shared.datasets import load_scifact
    from shared.metrics import evaluate_run

    torch.set_num_threads(1)
    try:
        base = CurrentCrossEncoder(settings).get()
        trained = True
    except CrossEncoderNotTrained:
        base = load_cross_encoder()
        trained = False
    dataset = load_scifact()
    qrels = dict(sorted(dataset.qrels["test"].items())[:queries])
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(
        bm25s.tokenize(
            [f"{d.title} {d.text}" for d in dataset.corpus],
            stopwords="en",
            stemmer=stemmer,
            show_progress=False,
        ),
        show_progress=False,
    )
    candidates: dict[str, list[TextDoc]] = {}
    for qid in qrels:
        tokens = bm25s.tokenize(
            dataset.queries[qid], stopwords="en", stemmer=stemmer, show_progress=False
        )
        found, _ = retriever.retrieve(tokens, k=CANDIDATES, show_progress=False)
        top = [dataset.corpus[int(i)] for i in found[0]]
        candidates[qid] = [TextDoc(d.id, d.title, d.text) for d in top]

    variants: dict[str, Any] = {}
    for length in sorted({*lengths, base.max_length}):  # the baseline is always timed
        variant = TrainedCrossEncoder(base.model, length, version=base.version)
        variants[f"fp32@{length}"] = variant
    variants[f"int8@{base.max_length}"] = _quantised(base)
    scratch = Path(tempfile.mkdtemp(prefix="lodestar-ce-onnx-"))
    variants[f"onnx@{base.max_length}"] = OnnxCrossEncoder(base, scratch)
    variants[f"onnx-int8@{base.max_length}"] = OnnxCrossEncoder(base, scratch, int8=True)
    rows: dict[str, Any] = {}
    rankings: dict[str, dict[str, list[str]]] = {}
    for name, model in variants.items():
        model.score("warm up", candidates[next(iter(qrels))][:4])
        timings: list[float] = []
        rankings[name] = {}
        for qid, docs in candidates.items():
            started = time.perf_counter()
            scores = model.score(dataset.queries[qid], docs, batch_size=CANDIDATES)
            timings.append((time.perf_counter() - started) * 1000)
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            rankings[name][qid] = [docs[i].doc_id for i in order]
        run_scores = {
            qid: {d: float(len(r) - i) for i, d in enumerate(r)}
            for qid, r in rankings[name].items()
        }
        rows[name] = {
            "p50_ms": round(statistics.median(timings), 1),
            "mean_ms": round(statistics.fmean(timings), 1),
            "ndcg@10": round(evaluate_run(run_scores, qrels).mean["ndcg@10"], 4),
        }
    baseline = f"fp32@{base.max_length}"
    for name, row in rows.items():
        row["speedup_vs_fp32_serving"] = round(rows[baseline]["p50_ms"] / row["p50_ms"], 2)
        overlaps = [
            len(set(rankings[name][q][:10]) & set(rankings[baseline][q][:10])) / 10 for q in qrels
        ]
        row["top10_overlap_with_fp32_serving"] = round(statistics.fmean(overlaps), 3)
    result = {
        "benchmark": "cross-encoder latency, 50 candidates, one thread",
        "model": base.model_id,
        "trained": trained,
        "serving_max_length": base.max_length,
        "queries": len(qrels),
        "target_p50_ms": 120,
        "variants": rows,
        "provenance": provenance(),
    }
    shutil.rmtree(scratch, ignore_errors=True)
    write_json(out, result)
    return result


def command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    result = run(settings, args.queries, lengths, Path(args.out))
    print(
        f"{'variant':<14} {'p50 ms':>8} {'mean ms':>8} {'nDCG@10':>8} {'speedup':>8} {'top10':>6}"
    )
    for name, row in result["variants"].items():
        print(
            f"{name:<14} {row['p50_ms']:>8} {row['mean_ms']:>8} {row['ndcg@10']:>8} "
            f"{row['speedup_vs_fp32_serving']:>8} {row['top10_overlap_with_fp32_serving']:>6}"
        )
    print(f"model {result['model']} (trained: {result['trained']}); wrote {args.out}")
    return 0


def register(group: Any) -> None:
    parser = group.add_parser(
        "cross-encoder", help="cross-encoder re-ranking latency (50 candidates, one thread)"
    )
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--lengths", default="96,128,160,256", help="fp32 input lengths to time")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.set_defaults(handler=command)
