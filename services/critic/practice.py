"""Self-practice (SIM-RAG §3): the reasoner answers training questions over up to
``max_turns`` retrieval rounds with sampling, and every (context, answer, rationale) it writes
becomes a labelled example for the critic.

The rounds run through the orchestrator's own answer loop (``AnswerPipeline.rounds`` with the
``fixed`` policy, so nothing stops early), so the critic learns from exactly the contexts, answers
and rationales it will judge in service. Each round is labelled by exact match with a gold answer
(the paper's rule) and, as well, by answer accuracy (a gold answer inside the prediction), which a
135M reasoner that writes sentences reaches far more often; training chooses the rule.

Trajectories are published as one version of the ``critic-practice`` artefact family.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.artifacts import ArtifactFamily
from shared.datasets import load_hotpotqa, load_nq_open_oracle
from shared.metrics import exact_match, normalize_answer
from shared.schemas import Document, QAExample
from shared.settings import Settings

Progress = Callable[[int, int, str], None]
TRAJECTORIES_FILE = "trajectories.jsonl"
#: The paper's self-practice settings: up to 2 retrieval turns after the first answer, T = 0.6.
DEFAULT_MAX_TURNS = 2
DEFAULT_TEMPERATURE = 0.6
#: Documents per round (the paper retrieves the top 2 per query).
DEFAULT_PRACTICE_K = 2
#: Answer + rationale budget while practising (short: it is the bulk of the cost on a CPU).
DEFAULT_PRACTICE_MAX_NEW_TOKENS = 48


def practice_family(settings: Settings) -> ArtifactFamily:
    return ArtifactFamily(settings.data_dir / "critic" / "practice")


def load_practice_dataset(name: str) -> tuple[list[QAExample], list[Document]]:
    """Training questions and the corpus their collection ``eval-<name>`` is built from."""
    if name == "nq-oracle":
        return load_nq_open_oracle()
    if name in ("hotpotqa-train", "hotpotqa-dev"):
        return load_hotpotqa(name.split("-", 1)[1])
    raise ValueError(
        f"unknown practice dataset {name!r}; known: nq-oracle, hotpotqa-train, hotpotqa-dev"
    )


def answer_contains_gold(prediction: str, golds: Sequence[str]) -> bool:
    """A normalised gold answer occurs as whole words in the normalised prediction."""
    normalized = f" {normalize_answer(prediction)} "
    return any(g and f" {g} " in normalized for g in (normalize_answer(x) for x in golds))


@dataclass
class PracticeRow:
    """One turn of one trajectory: the critic's example plus what produced it."""

    qid: str
    turn: int
    question: str
    golds: list[str]
    context: str
    answer: str
    rationale: str
    raw: str
    em: int
    acc: int
    self_unsure: bool
    """The reasoner's self-assessment: it answered "unsure"."""
    query: str
    hit_ids: list[str]
    next_query: str | None
    correct_retrieval: bool
    """A gold supporting document was among those retrieved so far."""


def collection_for(dataset: str) -> str:
    return f"eval-{dataset}"


def ensure_practice_collection(engine: Any, dataset: str, corpus: Sequence[Document]) -> str:
    """The dataset's collection, built once (and reused by ``lodestar eval rag``)."""
    name = collection_for(dataset)
    if not engine.exists(name):
        engine.upsert(name, list(corpus))
    return str(engine.snapshot(name).version)


async def practice_question(
    pipeline: Any,
    example: QAExample,
    collection: str,
    *,
    max_turns: int,
    temperature: float,
    k: int,
) -> list[PracticeRow]:
    from services.orchestrator.prompts import is_unsure
    from services.orchestrator.rounds import StopPolicy
    from shared.store import Trace

    trace = Trace(kind="practice", request={"qid": example.id})
    outcome = await pipeline.run_rounds(
        trace,
        question=example.question,
        collection=collection,
        k=k,
        max_rounds=max_turns + 1,
        policy=StopPolicy.fixed,
        temperature=temperature,
    )
    gold_docs = set(example.supporting_doc_ids)
    seen: set[str] = set()
    rows = []
    for record in outcome.rounds:
        seen.update(h.doc_id for h in record.hits)
        rows.append(
            PracticeRow(
                qid=example.id,
                turn=record.round - 1,
                question=example.question,
                golds=list(example.answers),
                context=record.context,
                answer=record.answer,
                rationale=record.rationale,
                raw=record.raw,
                em=int(exact_match(record.answer, example.answers)),
                acc=int(answer_contains_gold(record.answer, example.answers)),
                self_unsure=is_unsure(record.answer),
                query=record.query,
                hit_ids=[h.doc_id for h in record.hits],
                next_query=record.next_query,
                correct_retrieval=bool(gold_docs & seen),
            )
        )
    return rows


def run_self_practice(
    settings: Settings,
    dataset: str,
    *,
    offset: int,
    limit: int,
    max_turns: int = DEFAULT_MAX_TURNS,
    temperature: float = DEFAULT_TEMPERATURE,
    k: int = DEFAULT_PRACTICE_K,
    max_new_tokens: int = DEFAULT_PRACTICE_MAX_NEW_TOKENS,
    progress: Progress | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Generate trajectories for questions ``offset … offset+limit`` of ``dataset`` and publish
    them; returns the manifest. Idempotent: a rerun publishes a new version of the same kind.
    With ``time_budget_s``, questions not started by then are left out (the manifest counts the
    questions practised)."""
    from services.index.engine import IndexEngine
    from services.orchestrator.pipeline import answer_pipeline, in_process_search
    from shared.llm import chat_generator

    questions, corpus = load_practice_dataset(dataset)
    chosen = questions[offset : offset + limit]
    if not chosen:
        raise ValueError(f"{dataset} has no questions at offset {offset}")
    engine = IndexEngine.from_settings(settings)
    collection_version = ensure_practice_collection(engine, dataset, corpus)
    pipeline = answer_pipeline(
        settings,
        in_process_search(settings, engine),
        lambda: chat_generator(settings),
        max_new_tokens=max_new_tokens,
    )
    family = practice_family(settings)
    started = time.perf_counter()
    counts = {"rows": 0, "em": 0, "acc": 0, "unsure": 0}
    manifest = {
        "kind": "critic-practice",
        "dataset": dataset,
        "collection": collection_for(dataset),
        "collection_version": collection_version,
        "question_offset": offset,
        "questions": len(chosen),
        "max_turns": max_turns,
        "temperature": temperature,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "reasoner": chat_generator(settings).model_id,
    }
    # Generate first (minutes), then hold the family lock only to publish: several practice
    # runs over different questions may go on at once.
    lines: list[str] = []
    practised = 0
    for done, example in enumerate(chosen):
        if progress is not None:
            progress(done, len(chosen), "self-practice")
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            break  # out of time: publish the questions practised so far
        practised += 1
        rows = asyncio.run(
            practice_question(
                pipeline,
                example,
                collection_for(dataset),
                max_turns=max_turns,
                temperature=temperature,
                k=k,
            )
        )
        for row in rows:
            lines.append(json.dumps(asdict(row), ensure_ascii=False) + "\n")
            counts["rows"] += 1
            counts["em"] += row.em
            counts["acc"] += row.acc
            counts["unsure"] += int(row.self_unsure)
    manifest.update(
        questions=practised, counts=counts, seconds=round(time.perf_counter() - started, 1)
    )
    with family.lock(), family.build(manifest) as scratch:
        (scratch / TRAJECTORIES_FILE).write_text("".join(lines), encoding="utf-8")
    if progress is not None:
        progress(len(chosen), len(chosen), "published")
    return family.read_manifest()


def read_trajectories(path: Path) -> list[PracticeRow]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(PracticeRow(**json.loads(line)))
    return rows


def load_all_trajectories(settings: Settings) -> tuple[list[PracticeRow], dict[str, Any]]:
    """Every published practice version's turns together (runs over different questions, e.g.
    several run side by side); a question practised twice keeps its latest run."""
    family = practice_family(settings)
    if family.current_version() is None:
        return load_current_trajectories(settings)
    by_question: dict[str, list[PracticeRow]] = {}
    versions = sorted(
        p.name for p in family.versions_dir.iterdir() if p.is_dir() and not p.name.endswith(".tmp")
    )
    for version in versions:
        for row in read_trajectories(family.versions_dir / version / TRAJECTORIES_FILE):
            by_question.setdefault(f"{version}/{row.qid}", []).append(row)
    latest: dict[str, list[PracticeRow]] = {}
    for key, rows in by_question.items():  # versions sort by time: later ones overwrite
        latest[key.split("/", 1)[1]] = rows
    # Runs may practise on different datasets (e.g. NQ and HotpotQA train): name them all, not
    # only the latest run's.
    datasets = sorted({str(family.read_manifest(v).get("dataset")) for v in versions})
    manifest = {
        **family.read_manifest(),
        "version": "+".join(versions),
        "dataset": "+".join(datasets),
    }
    return [row for rows in latest.values() for row in rows], manifest


def load_current_trajectories(settings: Settings) -> tuple[list[PracticeRow], dict[str, Any]]:
    family = practice_family(settings)
    current = family.current_path()
    if current is None:
        raise FileNotFoundError(
            f"no self-practice trajectories under {family.root}; run `lodestar critic practice`"
        )
    return read_trajectories(current / TRAJECTORIES_FILE), family.read_manifest()
