"""CAR (Anand et al. 2023): context-aware rewriting of *training* queries, plus InPars-style
synthetic training queries, both with SmolLM2-135M-Instruct.

CAR gives an LLM a training query together with its relevant document and asks for a specific,
disambiguated query that matches that document's intent; a ranker is then fine-tuned on the
rewrites while inference keeps using the original user query (no LLM at test time). The
``query-only`` mode is the paper's concept-drift ablation: the LLM sees the query alone.

What this module guarantees:

- **One rewrite per pair, greedy** (temperature 0 by default), cleaned to one line
  (:func:`clean_rewrite`); when the model writes nothing usable, or something absurdly long, the
  original query is kept and the record says ``fell_back=True``.
- **A disk cache per (mode, model, prompt version)**: ``<data_dir>/rewriter/cache/*.jsonl``, keyed
  by ``(qid, doc_id)``, one record appended and fsynced at a time, so a crash loses at most the
  record being written and a rerun of a batch makes no LLM call (``RewriterEngine.llm_calls``).
- **A leakage guard**: :meth:`RewriterEngine.rewrite_batch` refuses, with
  :class:`LeakageError`, a batch in which any pair's document is in ``forbidden_doc_ids`` (the
  documents judged in the test split), before any generation.
- **Provenance**: every record carries mode, model and prompt version, so rewritten and original
  queries are never confused downstream.

Prompt choice (``DEFAULT_CONTEXT_PROMPT = "context-instruct-v2"``), measured with
``python -m services.rewriter.measure --no-query-only`` (defaults: 30 SciFact *train* pairs, seed
0, test-judged documents excluded; greedy, 32 new tokens, passage cut to 192 tokens). BM25 (bm25s,
the index service's tokenisation) over the 5,183 abstracts ranks the relevant document when
retrieving with the rewrite vs the original query. ``overlap``: share of the rewrite's content
words found in the passage; ``copied8``: share of rewrites containing 8 consecutive passage words;
``fell back``: rewrites replaced by the original query. Generation took 515 s on the shared 2-core
machine (1 thread); a rerun comes from the cache in ~20 s.

=====================  ======  ====  =====  ======  =======  =======  =====  =========
query                  MRR@10  R@10  R@100  median  overlap  copied8  words  fell back
=====================  ======  ====  =====  ======  =======  =======  =====  =========
original               0.500   0.63  0.90   3       0.44     0.00     12.1   -
context-instruct-v2    0.714   0.83  0.97   1       0.61     0.07     13.7   7
context-terms-v1       0.656   0.77  0.90   1       0.48     0.10     25.8   0
=====================  ======  ====  =====  ======  =======  =======  =====  =========

``context-instruct-v2`` is a rewrite of query length: 10 of 30 pairs rank better than with the
original, 1 worse. Before the "talks about the prompt" cleaning rule (``_META``), 7 of its 30
outputs were "the passage above"-style echoes and it scored MRR@10 0.650 / R@100 0.80; those now
fall back to the original (7/30 pairs keep their query: a cost, not a gain). ``context-terms-v1``
(query + "key terms", joined by ``Prompt.combine``) gets SmolLM2 writing a sentence rather than
terms, so the result is the query plus a passage fragment, twice as long, copying more (3/30 vs
2/30) and still mentioning "the passage" in 7 (its records predate the stored raw output, so the
rule cannot re-clean them). ``context-fewshot-v2`` was only smoke-tested on 3 pairs (one copied a
passage sentence, one went off-topic) and left out of the 30-pair run for time. The rank gain is
partly leakage by construction (passage words in the query raise BM25): read it with ``copied8``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ErrorCode, LodestarError
from shared.models import LLM_ID, Generation
from shared.settings import Settings

logger = logging.getLogger(__name__)

Mode = Literal["context", "query-only"]
MODES: tuple[Mode, ...] = ("context", "query-only")
#: The cache "mode" of synthetic (InPars / doc2query) queries.
SYNTHETIC_MODE = "synthetic"
Progress = Callable[[int, int, str], None]

#: Tokens of the document (title + text) the context prompt may carry. SmolLM2 is a 135M model:
#: a long passage mostly makes it copy; 192 tokens keep the topic and the key terms.
DEFAULT_CONTEXT_TOKENS = 192
#: A query is a line; more than this is the model continuing to write, not a query.
DEFAULT_MAX_NEW_TOKENS = 32
MAX_REWRITE_CHARS = 300
MAX_REWRITE_WORDS = 40


class GeneratorLike(Protocol):
    """What the engine needs from ``shared.models.Generator``."""

    model_id: str

    @property
    def tokenizer(self) -> Any: ...  # read-only: shared.llm.RemoteGenerator loads it lazily

    def generate(
        self, messages: Sequence[dict[str, str]], *, max_new_tokens: int, temperature: float
    ) -> Generation: ...


# --- prompts -----------------------------------------------------------------------------------

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Prompt:
    """One versioned prompt: a change to its wording must change ``version`` (the cache key)."""

    version: str
    mode: str
    build: Callable[[str, str, str], Messages]
    """``build(query, title, text) -> chat messages`` (title/text empty in query-only mode)."""
    combine: Callable[[str, str], str] | None = None
    """``combine(query, cleaned output) -> rewrite``; ``None``: the output is the rewrite."""


_SYSTEM = "You rewrite search queries. Reply with one search query on one line and nothing else."


def _passage_block(title: str, text: str) -> str:
    return f"Title: {title}\n{text}" if title else text


def _context_instruct(query: str, title: str, text: str) -> Messages:
    return [
        {"role": "system", "content": _SYSTEM},
        {
            "role": "user",
            "content": (
                f"Passage:\n{_passage_block(title, text)}\n\n"
                f"Query: {query}\n\n"
                "The user who typed this query was looking for the passage above. Rewrite the "
                "query as a search query that is specific and unambiguous about what the user "
                "wants, in at most 20 words. Do not describe the passage and do not copy "
                "sentences from it.\nRewritten query:"
            ),
        },
    ]


# Fixed demonstrations for the few-shot variant: general-domain, written for this module, never
# taken from an evaluation set.
_REWRITE_SHOTS: tuple[tuple[str, str, str, str], ...] = (
    (
        "Jaguar",
        "The jaguar is a large cat species native to the Americas. It can reach a top speed of "
        "about 80 km/h over short distances and is an ambush predator.",
        "jaguar speed",
        "how fast can a jaguar, the big cat, run",
    ),
    (
        "Aspirin and myocardial infarction",
        "In a randomised trial of 22,071 physicians, 325 mg of aspirin every other day reduced "
        "the risk of a first myocardial infarction by 44 percent.",
        "Aspirin prevents heart problems.",
        "low-dose aspirin reduces the risk of a first heart attack (myocardial infarction)",
    ),
    (
        "Python (programming language)",
        "Python is a high-level programming language. Packages are installed from the Python "
        "Package Index with the pip tool.",
        "python install",
        "how to install packages for the python programming language with pip",
    ),
)


def _context_fewshot(query: str, title: str, text: str) -> Messages:
    instruction = "Rewrite the query so it is specific to what the user wanted from the passage."
    messages: Messages = [{"role": "system", "content": _SYSTEM}]
    for shot_title, shot_text, shot_query, shot_rewrite in _REWRITE_SHOTS:
        messages.append(
            {
                "role": "user",
                "content": f"Passage:\nTitle: {shot_title}\n{shot_text}\n\nQuery: {shot_query}\n"
                f"{instruction}",
            }
        )
        messages.append({"role": "assistant", "content": shot_rewrite})
    messages.append(
        {
            "role": "user",
            "content": f"Passage:\n{_passage_block(title, text)}\n\nQuery: {query}\n{instruction}",
        }
    )
    return messages


def _context_terms(query: str, title: str, text: str) -> Messages:
    """Disambiguation by expansion: the model names the passage's key terms; the rewrite is the
    query followed by them (see ``Prompt.combine``)."""
    return [
        {"role": "system", "content": "You name key terms. Reply with one line only."},
        {
            "role": "user",
            "content": (
                f"Passage:\n{_passage_block(title, text)}\n\nQuery: {query}\n\n"
                "List three to five key terms from the passage that make clear which topic the "
                "query is about, separated by commas.\nKey terms:"
            ),
        },
    ]


def _append_terms(query: str, terms: str) -> str:
    words = [w.strip(" ,;.") for w in re.split(r"[,;]", terms)]
    return " ".join([query, *[w for w in words if w]])


def _query_only(query: str, title: str, text: str) -> Messages:
    del title, text  # the ablation: the LLM never sees the document
    return [
        {"role": "system", "content": _SYSTEM},
        {
            "role": "user",
            "content": (
                f"Query: {query}\n\nRewrite the query so that it is specific and unambiguous. "
                "Keep it short, like a search query.\nRewritten query:"
            ),
        },
    ]


_SYNTHETIC_SHOTS: tuple[tuple[str, str, str], ...] = (
    (
        "Great Barrier Reef",
        "The Great Barrier Reef is the world's largest coral reef system, made of over 2,900 "
        "individual reefs off the coast of Queensland, Australia.",
        "where is the largest coral reef system in the world",
    ),
    (
        "Metformin",
        "Metformin is the first-line medication for the treatment of type 2 diabetes, in "
        "particular for people who are overweight.",
        "first line drug treatment for type 2 diabetes",
    ),
    (
        "Rickets",
        "Vitamin D deficiency in children causes rickets, a softening of the bones that leads to "
        "bowed legs and other deformities.",
        "what disease does vitamin d deficiency cause in children",
    ),
)


def _synthetic(query: str, title: str, text: str) -> Messages:
    """InPars / doc2query: a few-shot prompt asking for a query the document answers."""
    del query
    instruction = "Write a search query that this document answers."
    messages: Messages = [
        {"role": "system", "content": "You write search queries. Reply with one query only."}
    ]
    for shot_title, shot_text, shot_query in _SYNTHETIC_SHOTS:
        messages.append(
            {
                "role": "user",
                "content": f"Document:\nTitle: {shot_title}\n{shot_text}\n\n{instruction}",
            }
        )
        messages.append({"role": "assistant", "content": shot_query})
    messages.append(
        {"role": "user", "content": f"Document:\n{_passage_block(title, text)}\n\n{instruction}"}
    )
    return messages


PROMPTS: dict[str, Prompt] = {
    p.version: p
    for p in (
        Prompt("context-instruct-v2", "context", _context_instruct),
        Prompt("context-fewshot-v2", "context", _context_fewshot),
        Prompt("context-terms-v1", "context", _context_terms, _append_terms),
        Prompt("query-only-v1", "query-only", _query_only),
        Prompt("synthetic-fewshot-v1", SYNTHETIC_MODE, _synthetic),
    )
}
#: Chosen by ``services.rewriter.measure`` (see the module docstring).
DEFAULT_CONTEXT_PROMPT = "context-instruct-v2"
DEFAULT_QUERY_ONLY_PROMPT = "query-only-v1"
DEFAULT_SYNTHETIC_PROMPT = "synthetic-fewshot-v1"
DEFAULT_PROMPTS: dict[str, str] = {
    "context": DEFAULT_CONTEXT_PROMPT,
    "query-only": DEFAULT_QUERY_ONLY_PROMPT,
    SYNTHETIC_MODE: DEFAULT_SYNTHETIC_PROMPT,
}


# --- cleaning ----------------------------------------------------------------------------------

_LABEL = re.compile(
    r"^(?:here(?:'s| is) (?:the|a|my|your) )?(?:(?:rewritten|revised|new|improved|specific|"
    r"search|final|updated|suggested|clarified|disambiguated)\s+)*(?:search\s+)?"
    r"(?:query|question|rewrite|answer)\s*(?:\d+\s*)?[:：\-–]\s*",
    re.IGNORECASE,
)
# "The passage discusses X" / "The topic of this passage is X": a description, keep the X.
_DESCRIPTION = re.compile(
    r"^the (?:topic of (?:this|the) passage|passage|document|user) "
    r"(?:is about|is|discusses|explores|describes|asks about|wants to know|is looking for)\s+"
    r"(?:about\s+)?",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(?:sure|okay|ok|certainly|of course|here)\b.*[:：]$", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"(?<=[a-z0-9)\]])[.!?]\s+(?=[A-Z])")
# The model talking about the prompt instead of rewriting ("the passage above", "the user wants
# to know …"): not a query (7 of 30 measured context-instruct-v2 outputs before this rule).
_META = re.compile(r"\b(?:the|this|that) (?:passage|user)\b|\bpassage above\b", re.IGNORECASE)
_BULLET = re.compile(r"^(?:[-*•>]+|\d+[.)])\s+")
_QUOTES = "\"'`“”‘’«»"


def clean_rewrite(raw: str, original: str) -> tuple[str, bool]:
    """The model's output as one query line, or ``(original, True)`` when nothing usable.

    Takes the first line with content after dropping preambles ("Sure, here is …:"), strips
    labels ("Rewritten query:"), bullets, markdown emphasis and surrounding quotes, and keeps the
    first sentence. Falls back to the original when the result is empty, absurdly long (> 40
    words or 300 characters) or talks about the prompt ("the passage", "the user") instead.
    """
    for line in raw.replace("\r", "\n").split("\n"):
        candidate = line.strip()
        if not candidate or _PREAMBLE.match(candidate):
            continue
        candidate = candidate.replace("**", "").replace("__", "").strip()
        candidate = _BULLET.sub("", candidate)
        for _ in range(2):  # "Rewritten query: "…"" and quoted labels
            candidate = _LABEL.sub("", candidate).strip().strip(_QUOTES).strip()
            candidate = _DESCRIPTION.sub("", candidate).strip()
        candidate = _SENTENCE_BREAK.split(candidate, maxsplit=1)[0].strip()
        if not candidate:
            continue
        words = candidate.split()
        if len(candidate) > MAX_REWRITE_CHARS or len(words) > MAX_REWRITE_WORDS:
            return original, True
        if _META.search(candidate):
            return original, True
        return " ".join(words), False
    return original, True


# --- records and the cache ---------------------------------------------------------------------


@dataclass(frozen=True)
class RewriteRecord:
    """One rewritten training query with its provenance: the original query, the document it
    was rewritten for, the mode, the model and the prompt version."""

    qid: str
    original_query: str
    doc_id: str
    rewritten_query: str
    mode: str
    model: str
    prompt_version: str
    fell_back: bool = False
    """The model wrote nothing usable: ``rewritten_query`` is the original query."""


@dataclass(frozen=True)
class SyntheticQuery:
    """One InPars / doc2query training query generated from ``doc_id``."""

    qid: str
    doc_id: str
    query: str
    model: str
    prompt_version: str
    fell_back: bool = False
    """The model wrote nothing usable; such a query is never kept."""
    rank: int | None = None
    """Rank of ``doc_id`` when retrieving with ``query`` (``None``: no filter, or not in top-k)."""


@dataclass
class SyntheticBatch:
    kept: list[SyntheticQuery]
    dropped: list[SyntheticQuery]
    """Fell back, or the filter did not rank the source document within top-k."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def input_digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


class RewriteCache:
    """JSON lines under ``<root>/<mode>__<model>__<prompt_version>.jsonl``, keyed (qid, doc_id).

    Each entry also stores the digest of the exact prompt input, so a changed query or document
    under an old id is generated again (the newest line of a key wins on load), and the model's
    raw output, so the engine cleans a hit again with the current :func:`clean_rewrite`. Appends take an
    exclusive ``flock`` and are fsynced; the service and the workers may share one file, and a
    miss first reads what other processes appended since (:meth:`refresh`). A torn last line (a
    crash mid-write) is skipped on load and terminated before the next append.
    """

    def __init__(self, root: Path, mode: str, model: str, prompt_version: str) -> None:
        self.path = root / f"{_slug(mode)}__{_slug(model)}__{_slug(prompt_version)}.jsonl"
        self._entries: dict[tuple[str, str], dict[str, Any]] = {}
        self._offset = 0
        self._lock = threading.Lock()
        self.refresh()

    def __len__(self) -> int:
        return len(self._entries)

    def refresh(self) -> None:
        """Read the complete lines appended since the last read (by any process)."""
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(self._offset)
                    data = handle.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1  # a line without its newline is still being written
            for raw in data[:end].split(b"\n"):
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw)
                    key = (str(entry["record"]["qid"]), str(entry["record"]["doc_id"]))
                except (ValueError, KeyError, TypeError):
                    logger.warning("skipping a damaged line in %s", self.path)
                    continue
                self._entries[key] = entry
            self._offset += end

    def get(self, qid: str, doc_id: str, digest: str) -> dict[str, Any] | None:
        """The cached record of ``(qid, doc_id)`` if it was made from the prompt ``digest``."""
        entry = self.get_entry(qid, doc_id, digest)
        return None if entry is None else dict(entry["record"])

    def get_entry(self, qid: str, doc_id: str, digest: str) -> dict[str, Any] | None:
        """The whole entry: ``{"input", "record", "raw"?}`` (``raw``: the model's output)."""
        key = (qid, doc_id)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.get("input") != digest:
            self.refresh()
            with self._lock:
                entry = self._entries.get(key)
        if entry is None or entry.get("input") != digest:
            return None
        return entry

    def put(self, record: dict[str, Any], digest: str, raw: str | None = None) -> None:
        entry: dict[str, Any] = {"input": digest, "record": record}
        if raw is not None:
            entry["raw"] = raw
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.path.open("ab+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                size = handle.seek(0, os.SEEK_END)
                if size:
                    handle.seek(size - 1)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")  # terminate a torn line so this one stays whole
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            self._entries[(str(record["qid"]), str(record["doc_id"]))] = entry


# --- the engine --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairDocument:
    """The relevant document of a training pair (``shared.schemas.Document`` fits too)."""

    id: str
    title: str
    text: str


class DocumentLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class RewritePair:
    """A training pair to rewrite: a query and its relevant document."""

    qid: str
    query: str
    document: DocumentLike


@dataclass(frozen=True)
class RewriteResult:
    record: RewriteRecord
    cached: bool


class LeakageError(LodestarError):
    """A batch would put a test-judged document into a rewrite prompt: CAR rewrites training
    queries only, and a test document in a prompt would leak the evaluation into training."""

    def __init__(self, offending: Sequence[tuple[str, str]]) -> None:
        shown = ", ".join(f"{qid}->{doc}" for qid, doc in offending[:5])
        more = f" and {len(offending) - 5} more" if len(offending) > 5 else ""
        super().__init__(
            ErrorCode.validation,
            f"{len(offending)} pair(s) use a forbidden (test-judged) document: {shown}{more}",
            field="pairs",
        )
        self.offending = list(offending)


def anonymous_ids(query: str, title: str, text: str) -> tuple[str, str]:
    """Stable ids for an ad-hoc request (HTTP ``/rewrite`` without ids): content hashes."""
    return f"q-{input_digest(query)[:16]}", f"d-{input_digest(title, text)[:16]}"


@dataclass
class RewriterConfig:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    """0 = greedy: one rewrite per (query, document) pair, at temperature 0."""
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    """Prompt version per mode (``context``, ``query-only``, ``synthetic``); a mode left out
    keeps its default."""

    @classmethod
    def from_env(cls) -> RewriterConfig:
        """The service's and the worker's configuration, from ``LODESTAR_REWRITER_*``."""
        env = RewriterSettings()
        prompts = dict(DEFAULT_PROMPTS)
        if env.context_prompt:
            prompts["context"] = env.context_prompt
        return cls(
            max_new_tokens=env.max_new_tokens,
            temperature=env.temperature,
            context_tokens=env.context_tokens,
            prompts=prompts,
        )


class RewriterSettings(BaseSettings):
    """``LODESTAR_REWRITER_*``: the rewriter's decoding budget (the platform settings stay
    untouched; a changed value changes the cache key, never serves stale rewrites)."""

    model_config = SettingsConfigDict(
        env_prefix="LODESTAR_REWRITER_", extra="ignore", use_attribute_docstrings=True
    )

    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=512)
    """Tokens a rewrite may take: a query needs ~20; more only lets the model ramble (slower)."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 = greedy, as CAR; above 0 samples (and caches the first sample)."""
    context_tokens: int = Field(default=DEFAULT_CONTEXT_TOKENS, ge=16, le=2048)
    """Document tokens in the context prompt: more context, slower prompts, more copying."""
    context_prompt: str = ""
    """Context prompt version; empty = ``DEFAULT_CONTEXT_PROMPT``."""


class RewriterEngine:
    """Rewrites training pairs and writes synthetic queries, through a persistent cache.

    The generator loads on first use (``generator_factory``), so cached work, validation and the
    leakage guard never load a model. ``llm_calls`` counts generations made by this instance.
    """

    def __init__(
        self,
        cache_root: Path,
        generator_factory: Callable[[], GeneratorLike],
        *,
        model_id: str = LLM_ID,
        config: RewriterConfig | None = None,
    ) -> None:
        self.cache_root = cache_root
        self.model_id = model_id
        self.config = config or RewriterConfig()
        self.config.prompts = {**DEFAULT_PROMPTS, **self.config.prompts}
        self._factory = generator_factory
        self._generator: GeneratorLike | None = None
        self._caches: dict[tuple[str, str], RewriteCache] = {}
        self._lock = threading.Lock()
        self.llm_calls = 0
        for mode, version in self.config.prompts.items():
            prompt = PROMPTS.get(version)
            if prompt is None or prompt.mode != mode:
                raise ValueError(f"prompt {version!r} is not a {mode!r} prompt")

    @classmethod
    def from_settings(
        cls, settings: Settings, config: RewriterConfig | None = None
    ) -> RewriterEngine:
        from shared.llm import chat_generator

        return cls(
            cache_root(settings),
            # Over the OpenAI protocol when LODESTAR_GENERATOR_URL is set (text is all CAR needs).
            lambda: chat_generator(settings),
            config=config or RewriterConfig.from_env(),
        )

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def generator(self) -> GeneratorLike:
        with self._lock:
            if self._generator is None:
                self._generator = self._factory()
                if self._generator.model_id != self.model_id:
                    raise RuntimeError(
                        f"generator is {self._generator.model_id}, engine caches {self.model_id}"
                    )
            return self._generator

    def prompt_version(self, mode: str) -> str:
        try:
            return self.config.prompts[mode]
        except KeyError:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown mode {mode!r}; one of {', '.join(MODES)}",
                field="mode",
            ) from None

    def cache(self, mode: str, prompt_version: str | None = None) -> RewriteCache:
        version = prompt_version or self.prompt_version(mode)
        key = (mode, version)
        with self._lock:
            if key not in self._caches:
                self._caches[key] = RewriteCache(self.cache_root, mode, self.model_id, version)
            return self._caches[key]

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int]:
        """``text`` cut to ``max_tokens`` tokens of the generator's tokenizer, and its length."""
        if max_tokens <= 0 or not text:
            return "", 0
        ids = self.generator.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text, len(ids)
        cut = str(self.generator.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True))
        return cut.strip(), max_tokens

    def fit_document(self, title: str, text: str) -> tuple[str, str]:
        """Title (at most a quarter of the budget) and text within ``context_tokens`` together."""
        budget = self.config.context_tokens
        title, used = self.truncate(title.strip(), budget // 4)
        text, _ = self.truncate(text.strip(), budget - used)
        return title, text

    def _digest(self, messages: Messages) -> str:
        """The cache's check on a hit: the exact prompt and decoding settings that produced it,
        so a reworded prompt (or another query or document under an old id) generates again."""
        rendered = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        return input_digest(rendered, str(self.config.max_new_tokens), str(self.config.temperature))

    def _generate(self, messages: Messages) -> str:
        generation = self.generator.generate(
            messages,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
        )
        with self._lock:
            self.llm_calls += 1
        return generation.text

    # -- CAR rewriting --------------------------------------------------------------------------

    def rewrite(
        self,
        query: str,
        document: DocumentLike | None,
        mode: str = "context",
        *,
        qid: str | None = None,
        prompt_version: str | None = None,
    ) -> RewriteResult:
        """Rewrite one (query, relevant document) pair; ``document`` may be ``None`` only in
        ``query-only`` mode. Without ``qid``/document id, content hashes key the cache."""
        version = prompt_version or self.prompt_version(mode)
        prompt = PROMPTS.get(version)
        if prompt is None or prompt.mode != mode:
            raise LodestarError(
                ErrorCode.validation, f"prompt {version!r} is not a {mode!r} prompt", field="mode"
            )
        query = query.strip()
        if not query:
            raise LodestarError(ErrorCode.empty, "query is empty", field="query")
        if mode == "context" and document is None:
            raise LodestarError(
                ErrorCode.validation, "context mode needs the relevant document", field="document"
            )
        title = document.title.strip() if document is not None else ""
        text = document.text.strip() if document is not None else ""
        auto_qid, auto_doc = anonymous_ids(query, title, text)
        qid = qid or auto_qid
        doc_id = document.id if document is not None and document.id else auto_doc
        cache = self.cache(mode, version)
        if mode == "context":
            title, text = self.fit_document(title, text)
        else:
            title = text = ""
        messages = prompt.build(query, title, text)
        digest = self._digest(messages)
        entry = cache.get_entry(qid, doc_id, digest)
        if entry is not None:
            return RewriteResult(self._from_cache(entry, prompt, query), cached=True)
        raw = self._generate(messages)
        rewritten, fell_back = self._finish(prompt, raw, query)
        record = RewriteRecord(
            qid=qid,
            original_query=query,
            doc_id=doc_id,
            rewritten_query=rewritten,
            mode=mode,
            model=self.model_id,
            prompt_version=version,
            fell_back=fell_back,
        )
        cache.put(asdict(record), digest, raw=raw)
        return RewriteResult(record, cached=False)

    @staticmethod
    def _finish(prompt: Prompt, raw: str, query: str) -> tuple[str, bool]:
        rewritten, fell_back = clean_rewrite(raw, query)
        if prompt.combine is not None and not fell_back:
            rewritten = prompt.combine(query, rewritten)
        return rewritten, fell_back

    def _from_cache(self, entry: dict[str, Any], prompt: Prompt, query: str) -> RewriteRecord:
        """A cached record, cleaned again from the stored raw output: a better cleaner applies
        to old generations without generating again."""
        record = RewriteRecord(**entry["record"])
        if "raw" in entry:
            rewritten, fell_back = self._finish(prompt, str(entry["raw"]), query)
        elif prompt.combine is None and not record.fell_back:  # written before raw was kept
            rewritten, fell_back = clean_rewrite(record.rewritten_query, query)
        else:
            return record
        return replace(record, rewritten_query=rewritten, fell_back=fell_back)

    def rewrite_batch(
        self,
        pairs: Iterable[RewritePair],
        mode: str = "context",
        *,
        forbidden_doc_ids: Iterable[str] | None = None,
        progress: Progress | None = None,
    ) -> list[RewriteRecord]:
        """Rewrite every pair (cached ones cost nothing), in order.

        Raises :class:`LeakageError` before any generation if a pair's document is in
        ``forbidden_doc_ids``: in CAR only training documents may enter a rewrite prompt.
        """
        items = list(pairs)
        self.prompt_version(mode)  # validates the mode before anything else
        if forbidden_doc_ids is not None:
            forbidden = set(forbidden_doc_ids)
            offending = [(p.qid, p.document.id) for p in items if p.document.id in forbidden]
            if offending:
                raise LeakageError(offending)
        records: list[RewriteRecord] = []
        generated = 0
        for done, pair in enumerate(items):
            result = self.rewrite(pair.query, pair.document, mode, qid=pair.qid)
            records.append(result.record)
            generated += not result.cached
            if progress is not None:
                progress(done + 1, len(items), f"rewrite ({generated} generated)")
        return records

    # -- InPars / doc2query synthetic queries ---------------------------------------------------

    def synthetic_query(self, document: DocumentLike) -> tuple[SyntheticQuery, bool]:
        """One synthetic query for ``document`` (``qid = syn-<doc id>``) and whether cached."""
        version = self.config.prompts[SYNTHETIC_MODE]
        prompt = PROMPTS[version]
        title, text = self.fit_document(document.title, document.text)
        qid = f"syn-{document.id}"
        messages = prompt.build("", title, text)
        digest = self._digest(messages)
        cache = self.cache(SYNTHETIC_MODE, version)
        entry = cache.get_entry(qid, document.id, digest)
        if entry is not None:
            made = SyntheticQuery(**entry["record"])
            if "raw" in entry:
                query, fell_back = clean_rewrite(str(entry["raw"]), "")
                made = replace(made, query=query, fell_back=fell_back)
            return made, True
        raw = self._generate(messages)
        # No original to fall back to: an empty string marks the failure.
        query, fell_back = clean_rewrite(raw, "")
        made = SyntheticQuery(
            qid=qid,
            doc_id=document.id,
            query=query,
            model=self.model_id,
            prompt_version=version,
            fell_back=fell_back,
        )
        cache.put(asdict(made), digest, raw=raw)
        return made, False

    def generate_queries(
        self,
        documents: Iterable[DocumentLike],
        *,
        retrieve: Callable[[str, int], Sequence[str]] | None = None,
        top_k: int = 10,
        progress: Progress | None = None,
    ) -> SyntheticBatch:
        """One synthetic training query per document (InPars / doc2query).

        With ``retrieve(query, k) -> ranked doc ids`` (e.g. Lodestar's hybrid retriever), a query
        is kept only if its source document ranks within ``top_k`` (a consistency filter);
        ``rank`` records where it came. Generations are cached; the filter runs every time.
        """
        items = list(documents)
        kept: list[SyntheticQuery] = []
        dropped: list[SyntheticQuery] = []
        generated = 0
        for done, document in enumerate(items):
            made, cached = self.synthetic_query(document)
            generated += not cached
            if made.fell_back:
                dropped.append(made)
            elif retrieve is None:
                kept.append(made)
            else:
                ranked = list(retrieve(made.query, top_k))[:top_k]
                rank = ranked.index(document.id) + 1 if document.id in ranked else None
                made = SyntheticQuery(**{**asdict(made), "rank": rank})
                (kept if rank is not None else dropped).append(made)
            if progress is not None:
                progress(done + 1, len(items), f"synthetic ({generated} generated)")
        return SyntheticBatch(kept, dropped)


def cache_root(settings: Settings) -> Path:
    return settings.data_dir / "rewriter" / "cache"


def sample_documents(documents: Sequence[Any], n: int, seed: int = 0) -> list[Any]:
    """``n`` documents drawn without replacement, reproducibly (in corpus order)."""
    import random

    if n >= len(documents):
        return list(documents)
    chosen = sorted(random.Random(seed).sample(range(len(documents)), n))
    return [documents[i] for i in chosen]


@dataclass
class DatasetPairs:
    pairs: list[RewritePair]
    forbidden_doc_ids: set[str]
    """Documents judged in the other splits (the test documents for ``train``)."""
    dropped: int
    """Pairs left out because their document is also judged in another split."""


def dataset_pairs(dataset: str, split: str = "train") -> DatasetPairs:
    """The (query, relevant document) pairs of a BEIR split, ``scifact/train`` say.

    A document judged relevant in another split (a test document) may not enter a rewrite
    prompt, so pairs pointing at one are dropped and counted; the rest pass the leakage guard.
    """
    from shared.datasets import load_scifact

    if dataset != "scifact":
        raise LodestarError(
            ErrorCode.validation, f"unknown dataset {dataset!r}; known: scifact", field="dataset"
        )
    beir = load_scifact()
    if split not in beir.qrels:
        raise LodestarError(
            ErrorCode.validation,
            f"{dataset} has no split {split!r}; has {', '.join(sorted(beir.qrels))}",
            field="split",
        )
    forbidden = {
        doc_id
        for other, judged in beir.qrels.items()
        if other != split
        for docs in judged.values()
        for doc_id, relevance in docs.items()
        if relevance > 0
    }
    by_id = {doc.id: doc for doc in beir.corpus}
    pairs: list[RewritePair] = []
    dropped = 0
    for qid, docs in beir.qrels[split].items():
        for doc_id, relevance in docs.items():
            if relevance <= 0:
                continue
            if doc_id in forbidden:
                dropped += 1
                continue
            pairs.append(RewritePair(qid, beir.queries[qid], by_id[doc_id]))
    return DatasetPairs(pairs, forbidden, dropped)
