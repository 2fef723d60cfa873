"""MiniLM as an ONNX graph for the query path: exported once, run by ONNX Runtime.

Embedding a query with sentence-transformers costs a Python-level trip through tokenisation,
``transformers``' BERT modules and the pooling layers; the same forward pass as one ONNX Runtime
graph is about 3× cheaper on one CPU thread with the same numbers (docs/search-performance.md).
So the index service embeds queries with this encoder and keeps sentence-transformers fp32 as the
reference (the passages are still embedded by it, and it is the fallback when the export or ONNX
Runtime is unavailable).

The export is offline and cached on disk: ``<models_dir>/minilm-onnx/`` holds ``model.onnx``
(the BERT body plus mean pooling and L2 normalisation, so the graph's output *is* the embedding)
and ``manifest.json`` with the SHA-256 of the ONNX file and of the source weights. A load checks
both; a mismatch (weights changed, file corrupted or truncated) re-exports. The export is written
aside and renamed into place under a file lock, so concurrent processes export once and a crash
never leaves half a model.

The graph comes from ``torch.onnx.export`` with the TorchScript (non-dynamo) exporter, through a
small wrapper that passes the inputs to BERT by keyword (positional order differs between
``transformers`` versions). Tokenisation uses the model's own ``tokenizer.json`` through
``tokenizers`` with sentence-transformers' settings (truncation at ``max_seq_length`` 256,
padding to the longest in the batch), so token ids equal the reference's.

``quantize_int8`` (ONNX Runtime dynamic quantisation) is offered for measurement only: it is not
the served default unless SciFact nDCG@10 holds (docs/search-performance.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.artifacts import sha256_of

logger = logging.getLogger(__name__)

ONNX_DIRNAME = "minilm-onnx"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
MANIFEST = "manifest.json"
OPSET = 17
#: Bumped when the exported graph changes (pooling, inputs): older exports are redone.
EXPORT_FORMAT = 1
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def source_weights(model_dir: Path) -> Path:
    return model_dir / "model.safetensors"


def max_seq_length(model_dir: Path) -> int:
    config = model_dir / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_seq_length", 256))
    return 256


def _export(model_dir: Path, target: Path) -> None:
    """Trace the BERT body + mean pooling + normalisation into ``target`` (TorchScript exporter)."""
    import torch
    from transformers import AutoModel

    bert: Any = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    bert.eval()

    class Pooled(torch.nn.Module):
        """Keyword inputs to BERT; masked mean over tokens, then L2 (sentence-transformers'
        Pooling(mean) + Normalize)."""

        def __init__(self, body: Any) -> None:
            super().__init__()
            self.body = body

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.body(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    wrapper = Pooled(bert).eval()
    example = {
        "input_ids": torch.tensor([[101, 7592, 2088, 102]], dtype=torch.int64),
        "attention_mask": torch.ones(1, 4, dtype=torch.int64),
        "token_type_ids": torch.zeros(1, 4, dtype=torch.int64),
    }
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUT_NAMES}
    axes["embedding"] = {0: "batch"}
    with torch.inference_mode():
        torch.onnx.export(
            wrapper,
            (),
            str(target),
            kwargs=example,
            input_names=list(INPUT_NAMES),
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _manifest_ok(directory: Path, model_dir: Path) -> bool:
    manifest_path = directory / MANIFEST
    if not manifest_path.exists() or not (directory / ONNX_FILE).exists():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return False
    return bool(
        manifest.get("format") == EXPORT_FORMAT
        and manifest.get("source_sha256") == sha256_of(source_weights(model_dir))
        and manifest.get("onnx_sha256") == sha256_of(directory / ONNX_FILE)
    )


def export_onnx(models_dir: Path, model_dir: Path, *, force: bool = False) -> Path:
    """The checked ONNX export of ``model_dir`` under ``models_dir`` (exported when missing,
    stale or corrupt). Returns its directory."""
    import torch

    directory = models_dir / ONNX_DIRNAME
    if not force and _manifest_ok(directory, model_dir):
        return directory
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / f".{ONNX_DIRNAME}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _manifest_ok(directory, model_dir):
            return directory
        started = time.perf_counter()
        scratch = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        _export(model_dir, scratch / ONNX_FILE)
        manifest = {
            "format": EXPORT_FORMAT,
            "source": str(model_dir.name),
            "source_sha256": sha256_of(source_weights(model_dir)),
            "onnx_sha256": sha256_of(scratch / ONNX_FILE),
            "opset": OPSET,
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "torch": torch.__version__,
            "max_seq_length": max_seq_length(model_dir),
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in scratch.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        scratch.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        logger.info(
            "exported MiniLM to ONNX in %.1f s (%s)", time.perf_counter() - started, directory
        )
    return directory


def quantize_int8(directory: Path) -> Path:
    """ONNX Runtime dynamic int8 (per-tensor weights, QInt8) beside the fp32 export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = directory / ONNX_INT8_FILE
    if not target.exists():
        scratch = directory / (ONNX_INT8_FILE + ".tmp")
        quantize_dynamic(str(directory / ONNX_FILE), str(scratch), weight_type=QuantType.QInt8)
        scratch.rename(target)
    return target


class OnnxQueryEncoder:
    """Normalised MiniLM embeddings from the exported graph. ``InferenceSession.run`` is
    thread-safe and releases the GIL, so concurrent queries run on different cores without a
    lock (the sentence-transformers path serialises them)."""

    backend = "onnx"

    def __init__(
        self,
        onnx_path: Path,
        model_dir: Path,
        *,
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.path = onnx_path
        self.session = ort.InferenceSession(str(onnx_path), options, providers=chosen)
        self.backend = "onnx-int8" if onnx_path.name == ONNX_INT8_FILE else "onnx"
        self.max_length = max_seq_length(model_dir)
        self._tokenizer_file = model_dir / "tokenizer.json"
        self._tokenizer_cls = Tokenizer
        # A tokenizers.Tokenizer holds padding/truncation state: one per thread.
        self._local = threading.local()
        self.dim = int(self.session.get_outputs()[0].shape[-1] or 384)

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._tokenizer_cls.from_file(str(self._tokenizer_file))
            tokenizer.enable_truncation(max_length=self.max_length)
            pad_id = tokenizer.token_to_id("[PAD]")
            tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
            self._local.tokenizer = tokenizer
        return tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer().encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        (vectors,) = self.session.run(["embedding"], self.tokenize(texts))
        return np.ascontiguousarray(vectors, dtype=np.float32)
