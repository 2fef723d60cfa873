"""The fmindex engine: SEAL retrieval over versioned FM-index collections.

One query runs, in order: body decoding (constrained beam search after ``query || body``, every
partial hypothesis kept), the unigram distribution (the first body step, for free), title
decoding (after ``query || title``, from the separator's interval to ``<TITLE_EOS>``), key
weighting and SEAL's intersective scoring. Timings separate the model (decoding) from the index
work (continuations, counts, locate, scoring).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.fmindex.corpus import BODY_MARKER, TITLE_MARKER, CollectionStore, FmCollection
from services.fmindex.decoding import CausalLM, SearchConfig, constrained_beam_search
from services.fmindex.scoring import (
    Key,
    Match,
    ScoredDocument,
    ScoringConfig,
    build_keys,
    score_documents,
)
from services.fmindex.training import GENERATOR_FAMILY
from shared.artifacts import ArtifactFamily
from shared.settings import Settings

#: Zero-shot prompts for the untuned generator (``prompt_style`` ``plain``): a plain-text
#: continuation, so the n-gram is the model's next words and starts with a space-prefixed token
#: like the index's (the BPE mismatch SEAL warns about); an untuned LM continues text far better
#: than it follows the ``||`` markers it has never seen.
PLAIN_PROMPTS = {
    "body": "Query: {query}\nA relevant passage says that",
    "title": "Query: {query}\nThe title of a relevant article is:",
}


class FmSettings(BaseSettings):
    """fmindex knobs (``LODESTAR_FMINDEX_*``); defaults are SEAL's ``SEALSearcher.DEFAULTS``."""

    model_config = SettingsConfigDict(env_prefix="LODESTAR_FMINDEX_", extra="ignore")

    beam: int = 15
    length: int = 10
    """Longest body n-gram (tokens)."""
    decode_titles: bool = True
    title_length: int = 40
    """Longest title decoded (tokens, ``<TITLE_EOS>`` included); SciFact titles reach ~35."""
    diverse_bs_groups: int = 1
    diverse_bs_penalty: float = 0.0
    generator: str = "auto"
    """``auto``: the newest fine-tuned generator if one is published, else SmolLM2 as shipped;
    ``base``: always SmolLM2 as shipped; or a model directory."""
    min_generator_steps: int = 100
    """``auto`` ignores a published generator that trained for fewer optimiser steps (a
    time-capped run on a busy machine can stop after a handful, before it learnt the task; the
    shipped model with a plain-text prompt is then the better generator)."""
    threads: int = 0
    """torch threads for decoding (0: torch's default)."""


@dataclass
class SearchOptions:
    beam: int
    length: int
    decode_titles: bool
    title_length: int
    groups: int
    diversity_penalty: float
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


@dataclass
class FmHitResult:
    doc_id: str
    title: str
    text: str
    score: float
    matches: list[Match]
    unigrams: list[Match]


@dataclass
class FmSearchOutcome:
    collection: str
    version: str
    hits: list[FmHitResult]
    timings_ms: dict[str, float]
    keys: list[Key]
    generator: str


def resolve_generator_dir(settings: Settings, choice: str, min_steps: int = 0) -> Path:
    """The generator's model directory; ``auto`` takes the published fine-tuned one only when
    it trained for at least ``min_steps`` optimiser steps."""
    from services.fmindex.jobs import generator_root
    from shared.models import prepare_llm

    if choice == "base":
        return prepare_llm(settings)
    if choice == "auto":
        family = ArtifactFamily(generator_root(settings))
        version = family.current_version()
        if version is not None and int(family.read_manifest(version).get("steps", 0)) >= min_steps:
            return family.loadable(version)
        return prepare_llm(settings)
    return Path(choice)


class FmEngine:
    def __init__(
        self,
        store: CollectionStore,
        lm_factory: Callable[[], CausalLM],
        fm_settings: FmSettings | None = None,
    ) -> None:
        self.store = store
        self.fm_settings = fm_settings or FmSettings()
        self._lm_factory = lm_factory
        self._lm: CausalLM | None = None
        self._lm_lock = threading.Lock()
        self._collections: dict[str, FmCollection] = {}
        self._collections_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, fm_settings: FmSettings | None = None) -> FmEngine:
        from services.fmindex.jobs import collections_root
        from shared.models import resolve_device

        fm_settings = fm_settings or FmSettings()

        def load() -> CausalLM:
            directory = resolve_generator_dir(
                settings, fm_settings.generator, fm_settings.min_generator_steps
            )
            return CausalLM(directory, resolve_device(settings.device), fm_settings.threads or None)

        return cls(CollectionStore(collections_root(settings)), load, fm_settings)

    @property
    def lm(self) -> CausalLM:
        with self._lm_lock:
            if self._lm is None:
                self._lm = self._lm_factory()
            return self._lm

    @property
    def generator_name(self) -> str:
        return str(self.lm.model_dir)

    def default_options(self) -> SearchOptions:
        s = self.fm_settings
        return SearchOptions(
            beam=s.beam,
            length=s.length,
            decode_titles=s.decode_titles,
            title_length=s.title_length,
            groups=s.diverse_bs_groups,
            diversity_penalty=s.diverse_bs_penalty,
        )

    def names(self) -> list[str]:
        return self.store.names()

    def collection(self, name: str) -> FmCollection:
        """The current version (reloaded when a build publishes a newer one)."""
        version = self.store.current_version(name)
        with self._collections_lock:
            cached = self._collections.get(name)
            if cached is not None and cached.version == version:
                return cached
            loaded = self.store.load(name)
            self._collections[name] = loaded
            return loaded

    def search(
        self, name: str, query: str, k: int, options: SearchOptions | None = None
    ) -> FmSearchOutcome:
        options = options or self.default_options()
        started = time.perf_counter()
        collection = self.collection(name)
        lm = self.lm
        fm = collection.fm
        separator = int(collection.manifest["separator_id"])
        title_eos = int(collection.manifest["title_eos_id"])
        timings: dict[str, float] = {}
        ngrams: list[tuple[tuple[int, ...], float, str]] = []
        with lm.lock:
            body_prompt = self.prompt(lm, query, "body")
            t0 = time.perf_counter()
            initial = lm.start(body_prompt)
            prompt_s = time.perf_counter() - t0
            unigram_logprobs = initial[1]
            body_config = SearchConfig(
                beam=options.beam,
                max_length=options.length,
                groups=options.groups,
                diversity_penalty=options.diversity_penalty,
                banned=frozenset({separator}),
            )
            body = constrained_beam_search(lm, fm, body_prompt, body_config, initial=initial)
            ngrams += [(n.tokens, n.logprob, "body") for n in body.ngrams]
            model_s = prompt_s + body.seconds_model
            index_s = body.seconds_index
            passes = 1 + body.forward_passes
            if options.decode_titles:
                titles = constrained_beam_search(
                    lm,
                    fm,
                    self.prompt(lm, query, "title"),
                    replace(body_config, max_length=options.title_length),
                    start=fm.range([separator]),
                    eos=title_eos,
                )
                ngrams += [((separator, *n.tokens), n.logprob, "title") for n in titles.ngrams]
                model_s += titles.seconds_model
                index_s += titles.seconds_index
                passes += titles.forward_passes
        timings["decode_ms"] = model_s * 1000
        timings["decode_index_ms"] = index_s * 1000
        t0 = time.perf_counter()
        keys, unigram_keys = build_keys(
            ngrams, fm, options.scoring, unigram_logprobs, banned=frozenset({separator, title_eos})
        )
        timings["keys_ms"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        scored = score_documents(
            keys, unigram_keys, fm, collection.doc_of, collection.doc_tokens, options.scoring, k
        )
        timings["scoring_ms"] = (time.perf_counter() - t0) * 1000
        timings["index_ms"] = (
            timings["decode_index_ms"] + timings["keys_ms"] + timings["scoring_ms"]
        )
        timings["total_ms"] = (time.perf_counter() - started) * 1000
        timings["forward_passes"] = float(passes)
        return FmSearchOutcome(
            collection=collection.name,
            version=collection.version,
            hits=[self._hit(collection, d) for d in scored],
            timings_ms=timings,
            keys=keys,
            generator=str(lm.model_dir),
        )

    @staticmethod
    def _hit(collection: FmCollection, scored: ScoredDocument) -> FmHitResult:
        return FmHitResult(
            doc_id=collection.doc_ids[scored.doc],
            title=collection.titles[scored.doc],
            text=collection.texts[scored.doc],
            score=scored.score,
            matches=scored.matches,
            unigrams=scored.unigrams,
        )

    @staticmethod
    def prompt_style(lm: CausalLM) -> str:
        """``markers`` for a generator fine-tuned on SEAL pairs (``query || body``), ``plain``
        for SmolLM2 as shipped, which has never seen the markers and continues them as text
        (``" |"`` n-grams)."""
        manifest = Path(lm.model_dir) / "manifest.json"
        if manifest.exists() and GENERATOR_FAMILY in manifest.read_text():
            return "markers"
        return "plain"

    def prompt(self, lm: CausalLM, query: str, target: str) -> list[int]:
        if self.prompt_style(lm) == "markers":
            return lm.encode(query + (BODY_MARKER if target == "body" else TITLE_MARKER))
        return lm.encode(PLAIN_PROMPTS[target].format(query=query))

    def describe_key(self, key: Key) -> str:
        return str(self.lm.tokenizer.decode(list(key.tokens), skip_special_tokens=False))


def with_overrides(options: SearchOptions, **overrides: Any) -> SearchOptions:
    """Options with the non-``None`` overrides applied (request-level knobs)."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(options, **chosen)
