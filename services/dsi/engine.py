"""The dsi service's engine: serve a collection's current DSI model and run continual steps.

Each collection is an artefact family under ``<data_dir>/dsi/<collection>`` whose versions hold a
complete, immutable checkpoint (model, docid map, documents, pseudo-query memory, query generator).
A continual step trains on a private copy and publishes a new version atomically, so searches keep
using the last good model throughout and after a crash. A step saves its progress every epoch
under ``resume/<job id>/``; a job delivered again after a crash continues from there.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from services.dsi.continual import (
    METHODS,
    PromptedQueryGenerator,
    doc_text,
    generate_pseudo_queries,
    generate_pseudo_queries_lm,
    index_examples,
    query_examples,
    step_examples,
    train_query_generator,
)
from services.dsi.docids import DocidKind, DocidScheme, Trie, docid_text
from services.dsi.model import T5Dsi, T5Shape, build_trie, max_decode_steps, text_tokenizer
from services.dsi.training import TrainConfig, rank_docids, train
from shared.artifacts import ArtifactFamily
from shared.errors import ErrorCode, LodestarError
from shared.schemas import Document, is_valid_collection_name
from shared.settings import Settings

Progress = Callable[[int, int, str], None]


@dataclass
class StepOptions:
    """One continual step's recipe (the first step of a collection trains D0 from scratch)."""

    method: str = "genmem+sam"
    docid: DocidKind = "semantic"
    epochs: int = 10
    first_epochs: int = 30
    qg_epochs: int = 10
    query_generator: Literal["t5", "lm"] = "lm"
    """Generative memory's doc -> query generator: ``lm`` prompts the pretrained SmolLM2 with the
    first real pairs as demonstrations; ``t5`` trains a T5 of the DSI shape on the real pairs
    (measured in docs/dsi.md: from scratch it emits word salad)."""
    demonstrations: int = 3
    sam_rho: float = 0.05
    pseudo_per_doc: int = 2
    replay_per_new_doc: int = 2
    d_model: int = 128
    layers: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    clusters: int = 10
    leaf_size: int = 100
    seed: int = 0


@dataclass
class StepResult:
    collection: str
    version: str
    method: str
    new_documents: int
    documents: int
    updates: int
    passes: int
    seconds: float
    resumed_from_epoch: int = 0
    note: str = ""


@dataclass
class Snapshot:
    """An immutable loaded version: what one search reads."""

    version: str
    model: T5Dsi
    scheme: DocidScheme
    trie: Trie
    max_steps: int
    documents: dict[str, Document]
    manifest: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def check_collection(name: str) -> str:
    if not is_valid_collection_name(name):
        raise LodestarError(ErrorCode.validation, f"invalid collection name {name!r}", field="name")
    return name


class DsiEngine:
    def __init__(
        self,
        data_dir: Path,
        embedder: Callable[[], Any] | None = None,
        device: str = "cpu",
        llm: Callable[[], Any] | None = None,
    ) -> None:
        self.root = data_dir / "dsi"
        self.device = device
        self._embedder = embedder
        self._llm = llm
        self._snapshots: dict[str, Snapshot] = {}
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DsiEngine:
        from shared.llm import chat_generator
        from shared.models import get_embedder, resolve_device

        device = resolve_device(settings.device)
        if device == "cpu":
            # Small models on a shared CPU: extra threads mostly spin and contend.
            torch.set_num_threads(1)
        return cls(
            settings.data_dir,
            lambda: get_embedder(settings),
            device,
            lambda: chat_generator(settings),  # text only: over the protocol when configured
        )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = text_tokenizer()
        return self._tokenizer

    def family(self, name: str) -> ArtifactFamily:
        return ArtifactFamily(self.root / check_collection(name))

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "CURRENT").exists())

    # --- serving -------------------------------------------------------------------------------

    def snapshot(self, name: str) -> Snapshot:
        """The collection's current version, reloaded when a newer one has been published."""
        family = self.family(name)
        version = family.current_version()
        if version is None:
            raise LodestarError(
                ErrorCode.not_found,
                f"collection {name!r} has no DSI model yet: POST /collections/{name}/dsi/index",
            )
        with self._lock:
            cached = self._snapshots.get(name)
            if cached is not None and cached.version == version:
                return cached
            snapshot = self._load(family.loadable(version), version)
            self._snapshots[name] = snapshot
            return snapshot

    def _load(self, directory: Path, version: str) -> Snapshot:
        model = T5Dsi.load(directory / "model", self.tokenizer)
        model.model.to(self.device)
        scheme = DocidScheme.from_json(json.loads((directory / "docids.json").read_text()))
        documents = {
            row["id"]: Document(**row)
            for row in map(json.loads, (directory / "documents.jsonl").read_text().splitlines())
        }
        docids = list(scheme.doc_of)
        return Snapshot(
            version=version,
            model=model,
            scheme=scheme,
            trie=build_trie(model, docids),
            max_steps=max_decode_steps(docids),
            documents=documents,
            manifest=json.loads((directory / "manifest.json").read_text()),
        )

    def search(
        self, name: str, query: str, k: int
    ) -> tuple[Snapshot, list[tuple[Document, str, float]]]:
        """Top-``k`` documents by trie-constrained beam search (beam width ``max(k, 10)``);
        the score is the docid's summed log-probability."""
        snapshot = self.snapshot(name)
        with snapshot.lock:  # one decoder per model at a time: torch modules are not re-entrant
            ranked = rank_docids(
                snapshot.model,
                [query],
                snapshot.trie,
                beam=max(k, 10),
                max_tokens=int(snapshot.manifest.get("query_tokens", 32)),
                max_steps=snapshot.max_steps,
                to_docid=snapshot.model.docid_of_symbols,
            )[0]
        hits = []
        for docid, score in ranked[:k]:
            doc_id = snapshot.scheme.doc_of[docid]
            hits.append((snapshot.documents[doc_id], docid_text(docid), score))
        return snapshot, hits

    # --- continual indexing ----------------------------------------------------------------------

    def index_step(
        self,
        name: str,
        documents: Sequence[Document],
        queries: Sequence[tuple[str, str]] = (),
        options: StepOptions | None = None,
        *,
        job_id: str = "inline",
        progress: Progress | None = None,
    ) -> StepResult:
        """Index a batch of documents as one continual step (D0 when the collection is new).

        ``queries`` are (doc id, real query) pairs: on D0 they train the retrieval task and the
        query generator; later steps use only pseudo-queries (new documents have no real queries).
        Idempotent: documents already in the current version are skipped, and a batch that is
        entirely present publishes nothing.
        """
        options = options or StepOptions()
        if options.method not in METHODS or METHODS[options.method].retrain:
            raise LodestarError(
                ErrorCode.validation,
                f"method must be one of {[m for m, v in METHODS.items() if not v.retrain]}",
                field="method",
            )
        family = self.family(name)
        started = time.perf_counter()
        report = progress or (lambda done, total, stage: None)
        with family.lock():
            current = family.current_path()
            base = None if current is None else self._load(current, family.current_version() or "")
            known = set() if base is None else set(base.scheme.docid_of)
            new_docs = _dedupe([d for d in documents if d.id not in known])
            if not new_docs:
                version = family.current_version() or ""
                return StepResult(
                    name,
                    version,
                    options.method,
                    0,
                    len(known),
                    0,
                    0,
                    0.0,
                    note="every document is already indexed",
                )
            resume_dir = family.root / "resume" / re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)
            base_version = None if base is None else base.version
            if base is None:
                state = self._first_step(new_docs, queries, options, report)
            else:
                state = self._next_step(base, new_docs, options, report)
            model, scheme, pseudo, generator, examples, config, all_docs = state
            start_epoch = _resume(resume_dir, model, base_version, len(new_docs))
            total = config.epochs

            def checkpoint(epoch: int) -> None:
                _save_resume(resume_dir, model, epoch, base_version, len(new_docs))

            stats = train(
                model,
                examples,
                config,
                start_epoch=start_epoch,
                progress=lambda e, n, loss: report(e, total, f"training (loss {loss:.3f})"),
                on_epoch_end=checkpoint,
            )
            report(total, total, "publishing")
            manifest = {
                "collection": name,
                "method": options.method,
                "docid": scheme.kind,
                "documents": len(all_docs),
                "steps": 1 if base is None else int(base.manifest.get("steps", 1)) + 1,
                "options": asdict(options),
                "query_tokens": config.query_tokens,
                "doc_tokens": config.doc_tokens,
                "updates": stats.updates,
                "passes": stats.passes,
                "base_version": base_version,
            }
            with family.build(manifest) as scratch:
                model.save(scratch / "model")
                (scratch / "docids.json").write_text(json.dumps(scheme.to_json()))
                with (scratch / "documents.jsonl").open("w", encoding="utf-8") as handle:
                    for doc in all_docs:
                        handle.write(json.dumps(doc.model_dump(), ensure_ascii=False) + "\n")
                (scratch / "pseudo_queries.json").write_text(json.dumps(pseudo))
                if isinstance(generator, PromptedQueryGenerator):
                    generator.save(scratch / "query_prompt")
                elif generator is not None:
                    generator.save(scratch / "query_generator")
            shutil.rmtree(resume_dir, ignore_errors=True)
            family.prune(keep=2)
            version = family.current_version() or ""
        return StepResult(
            collection=name,
            version=version,
            method=options.method,
            new_documents=len(new_docs),
            documents=len(all_docs),
            updates=stats.updates,
            passes=stats.passes,
            seconds=round(time.perf_counter() - started, 3),
            resumed_from_epoch=start_epoch,
        )

    def _config(self, options: StepOptions, epochs: int, sam: bool) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            batch_size=options.batch_size,
            lr=options.lr,
            sam_rho=options.sam_rho if sam else None,
            seed=options.seed,
        )

    def _embed(self, docs: Sequence[Document]) -> Any:
        if self._embedder is None:
            raise LodestarError(ErrorCode.unavailable, "semantic docids need the embedder")
        return self._embedder().encode([doc_text(d) for d in docs])

    def _first_step(
        self,
        docs: list[Document],
        queries: Sequence[tuple[str, str]],
        options: StepOptions,
        report: Progress,
    ) -> Any:
        """D0: docids, the query generator on the real pairs, then DSI on index + real + pseudo."""
        torch.manual_seed(options.seed)
        embeddings = self._embed(docs) if options.docid == "semantic" else None
        scheme = DocidScheme.create(
            options.docid,
            [d.id for d in docs],
            embeddings,
            k=options.clusters,
            leaf_size=options.leaf_size,
            seed=options.seed,
        )
        shape = T5Shape(d_model=options.d_model, layers=options.layers, d_ff=options.d_model * 4)
        by_id = {d.id: d for d in docs}
        real: dict[str, list[str]] = {}
        for doc_id, query in queries:
            if doc_id in by_id:
                real.setdefault(doc_id, []).append(query)
        generator: Any = None
        pseudo: dict[str, list[str]] = {}
        pairs = [(doc_text(by_id[i]), q) for i, qs in real.items() for q in qs]
        if pairs and METHODS[options.method].memory and options.query_generator == "lm":
            generator = PromptedQueryGenerator(pairs[: options.demonstrations])
            pseudo = self._prompted_queries(generator, docs, options, report)
        elif pairs and METHODS[options.method].memory:
            report(0, options.first_epochs, "training the query generator")
            generator, _ = train_query_generator(
                pairs,
                shape=shape,
                epochs=options.qg_epochs,
                batch_size=options.batch_size,
                seed=options.seed,
                device=self.device,
            )
            generator.tokenizer = self.tokenizer
            pseudo = generate_pseudo_queries(
                generator, docs, options.pseudo_per_doc, seed=options.seed
            )
        model = T5Dsi(shape, self.tokenizer, seed=options.seed)
        model.ensure_docid_tokens(scheme.max_token_value + 1)
        model.model.to(self.device)
        examples = (
            index_examples(docs, scheme)
            + query_examples(real, scheme, "query")
            + query_examples(pseudo, scheme, "pseudo")
        )
        config = self._config(options, options.first_epochs, METHODS[options.method].sam)
        return model, scheme, pseudo, generator, examples, config, docs

    def _prompted_queries(
        self,
        generator: PromptedQueryGenerator,
        docs: Sequence[Document],
        options: StepOptions,
        report: Progress,
    ) -> dict[str, list[str]]:
        if self._llm is None:
            raise LodestarError(
                ErrorCode.validation,
                "query_generator 'lm' needs the engine's LLM (DsiEngine.from_settings)",
                field="query_generator",
            )
        return generate_pseudo_queries_lm(
            self._llm(),
            docs,
            options.pseudo_per_doc,
            generator.demonstrations,
            progress=lambda done, total: report(
                0, options.epochs, f"pseudo-queries {done}/{total}"
            ),
        )

    def _next_step(
        self, base: Snapshot, docs: list[Document], options: StepOptions, report: Progress
    ) -> Any:
        """D_n: extend the docids, pseudo-queries for the new documents, the method's data mix."""
        method = METHODS[options.method]
        scheme = DocidScheme.from_json(base.scheme.to_json())  # never mutate the serving copy
        embeddings = self._embed(docs) if scheme.kind == "semantic" else None
        scheme.extend([d.id for d in docs], embeddings)
        model = base.model.copy()
        model.ensure_docid_tokens(scheme.max_token_value + 1)
        model.model.to(self.device)
        version_dir = self.family(base.manifest["collection"]).versions_dir / base.version
        pseudo: dict[str, list[str]] = json.loads((version_dir / "pseudo_queries.json").read_text())
        generator: Any = None
        if (version_dir / "query_prompt").exists():
            generator = PromptedQueryGenerator.load(version_dir / "query_prompt")
            if method.memory:
                pseudo.update(self._prompted_queries(generator, docs, options, report))
        elif (version_dir / "query_generator").exists():
            generator = T5Dsi.load(version_dir / "query_generator", self.tokenizer)
            generator.model.to(self.device)
            if method.memory:
                report(0, options.epochs, "generating pseudo-queries")
                pseudo.update(
                    generate_pseudo_queries(
                        generator, docs, options.pseudo_per_doc, seed=options.seed
                    )
                )
        examples = step_examples(
            method,
            docs,
            list(base.scheme.docid_of),
            scheme,
            pseudo,
            replay_per_new_doc=options.replay_per_new_doc,
            rng=random.Random(options.seed + len(base.scheme.docid_of)),
        )
        config = self._config(options, options.epochs, method.sam)
        all_docs = [*base.documents.values(), *docs]
        return model, scheme, pseudo, generator, examples, config, all_docs


def _dedupe(docs: Sequence[Document]) -> list[Document]:
    seen: dict[str, Document] = {}
    for doc in docs:
        seen[doc.id] = doc  # the last copy of a repeated id wins, as in an upsert
    return list(seen.values())


def _resume(directory: Path, model: T5Dsi, base_version: str | None, new_docs: int) -> int:
    """Load a crashed attempt's last epoch checkpoint if it was for the same base and batch."""
    meta_path = directory / "state.json"
    if not meta_path.exists():
        return 0
    meta = json.loads(meta_path.read_text())
    if meta.get("base_version") != base_version or meta.get("new_docs") != new_docs:
        shutil.rmtree(directory, ignore_errors=True)
        return 0
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model.model.load_state_dict(state)
    return int(meta["epoch"])


def _save_resume(
    directory: Path, model: T5Dsi, epoch: int, base_version: str | None, new_docs: int
) -> None:
    """Write the epoch checkpoint aside, then rename: a crash mid-write leaves the previous one."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.pt.tmp"
    torch.save(model.model.state_dict(), tmp)
    tmp.replace(directory / "model.pt")
    meta_tmp = directory / "state.json.tmp"
    meta_tmp.write_text(
        json.dumps({"epoch": epoch, "base_version": base_version, "new_docs": new_docs})
    )
    meta_tmp.replace(directory / "state.json")
