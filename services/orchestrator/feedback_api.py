"""NExT-Search's shadow user mode, feedback export and offline-update jobs (HTTP shell).

Routes: ``POST /shadow/simulate``, ``PUT``/``GET /users/{user_id}/profile``,
``GET /feedback/export`` (JSON lines), ``POST /jobs/offline-update`` (202 + job id; its state
is at ``GET /jobs/{id}``). The logic lives in :mod:`services.orchestrator.shadow`,
:mod:`services.orchestrator.feedback_export` and :mod:`services.reranker.offline_update`.

Metrics (on the service's ``/metrics``): ``orchestrator_feedback_total{stage,source}``,
``orchestrator_shadow_user_agreement_total{outcome}`` and ``…_agreement_ratio`` (documents of
one trace that both a user and a shadow agent labelled relevant/irrelevant), and
``orchestrator_offline_updates_total{component,outcome}`` are read from the store at scrape
time (durable, the same for every replica, and no hook in ``/feedback``);
``orchestrator_shadow_simulations_total{agent}`` counts this process's simulations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from services.orchestrator import feedback_export, shadow
from shared.app import CeleryDep, SettingsDep, from_state, require_ready
from shared.clients import IndexClient
from shared.errors import ErrorCode, LodestarError, error_responses
from shared.jobs import TASK_OFFLINE_UPDATE, QueueChoice, route_queue
from shared.schemas import NotBool
from shared.settings import Settings
from shared.store import FeedbackIn, Store, new_id

# --- models ------------------------------------------------------------------------------------


class ShadowRequest(BaseModel):
    trace_id: str = Field(min_length=1, max_length=64)
    profile: str | None = Field(None, min_length=1, max_length=4000)
    """The user's profile text; without it, the stored profile of ``user_id`` (if named)."""
    user_id: str | None = Field(None, min_length=1, max_length=128)
    agent: Literal["auto", "llm", "cross-encoder", "both"] | None = None
    """Which agent judges (default: the ``shadow_agent`` setting)."""
    top_k: Annotated[int, Field(ge=1, le=50), NotBool] | None = None
    """Documents of the last ranking to judge (default: the ``shadow_top_k`` setting)."""


class ShadowFeedback(BaseModel):
    feedback_id: str
    created: bool
    stage: str
    target_type: str
    target_id: str
    action: str
    value: Any
    source: Literal["shadow"] = "shadow"
    agent_id: str
    confidence: float
    rationale: str


class ShadowResponse(BaseModel):
    trace_id: str
    agent_id: str
    user_id: str | None
    profile: str | None
    feedback: list[ShadowFeedback]


class ProfileRequest(BaseModel):
    profile: str = Field(min_length=1, max_length=4000)


class ProfileResponse(BaseModel):
    user_id: str
    profile: str
    updated_at: float


class TrainOverrides(BaseModel):
    """Cross-encoder training settings (``CrossEncoderTrainConfig``); unset ones keep its
    defaults."""

    steps: Annotated[int, Field(ge=1, le=100_000), NotBool] | None = None
    batch_size: Annotated[int, Field(ge=1, le=512), NotBool] | None = None
    negatives_per_query: Annotated[int, Field(ge=1, le=64), NotBool] | None = None
    loss: Literal["pointwise", "listwise"] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=1), NotBool] | None = None
    max_length: Annotated[int, Field(ge=16, le=512), NotBool] | None = None
    seed: Annotated[int, NotBool] | None = None


class OfflineUpdateRequest(BaseModel):
    component: Literal["reranker"]
    """What to fine-tune: the cross-encoder reranker (the only component with a trainer yet)."""
    since: Annotated[float, Field(ge=0), NotBool] | None = None
    """Use feedback created at or after this Unix time only."""
    min_examples: Annotated[int, Field(ge=1, le=1_000_000), NotBool] = 8
    """Fewest positive relevance labels to train on; fewer in the store answers 409 `conflict`
    here (the request is valid, the feedback is not there yet), and fails the job if feedback
    went away in between."""
    eval_fraction: Annotated[float, Field(gt=0, lt=1), NotBool] = 0.25
    min_gain: Annotated[float, Field(ge=0, le=1), NotBool] = 0.0
    """Held-out nDCG@10 gain a new model must exceed to be published."""
    max_p: Annotated[float, Field(gt=0, le=1), NotBool] = 0.05
    """... with a one-sided paired randomization test over the held-out queries at most this
    p (1 turns the test off; with m held-out queries the smallest p is 2^-m)."""
    replay: Annotated[float, Field(ge=0, le=10), NotBool] = 1.0
    """Examples replayed from the serving model's own training set per feedback example
    (rehearsal against forgetting; 0: feedback only)."""
    source: Literal["user", "shadow"] | None = None
    """Train on one source's feedback only (default: both, shadow weighted lower)."""
    train: TrainOverrides = TrainOverrides()
    queries: Literal["original", "car", "original+car"] = "original"
    """Which queries the labels train on: as typed, CAR-rewritten by the rewriter's LLM with the
    document marked relevant (no LLM at query time), or both."""
    queue: QueueChoice = "auto"
    """``auto``: ``gpu`` when a GPU worker is registered, else ``cpu`` (``route_queue``)."""


# --- engine wiring -----------------------------------------------------------------------------


class ShadowAgents:
    """Builds agents on demand: the LM is the service's generator; the cross-encoder is the
    published one, loaded in process on first use and followed as ``CURRENT`` moves."""

    def __init__(self, settings: Settings, generator: Callable[[], Any]) -> None:
        self.settings = settings
        self.generator = generator
        self._scorer: Any = None
        self._lock = threading.Lock()

    def scorer(self) -> shadow.RelevanceScorer | None:
        from services.reranker.offline_update import PublishedScorer, published_scorer

        with self._lock:
            if self._scorer is None:
                self._scorer = published_scorer(self.settings)
            scorer: PublishedScorer | None = self._scorer
            if scorer is not None and not scorer.current.trained:
                return None
            return scorer

    def agent(self, name: str) -> shadow.ShadowAgent:
        return shadow.make_agent(
            name,
            generator=self.generator,
            scorer=self.scorer,
            llm_threshold=self.settings.shadow_llm_threshold,
            ce_threshold=self.settings.shadow_ce_threshold,
            max_relevant=self.settings.shadow_max_relevant,
        )


class FeedbackCollector(Collector):
    """Feedback, agreement and offline-update counts read from the store at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.feedback_counts()
            pairs = self.store.doc_label_pairs()
            updates = self.store.offline_update_counts()
        except Exception:  # the store is down: /metrics still answers with the rest
            return
        yield _counter(
            "orchestrator_feedback",
            "Feedback stored, by stage and source",
            ["stage", "source"],
            counts,
        )
        agree = sum(1 for user, agent in pairs if user == agent)
        yield _counter(
            "orchestrator_shadow_user_agreement",
            "Documents labelled by both a user and a shadow agent, by whether the labels agree",
            ["outcome"],
            [("agree", agree), ("disagree", len(pairs) - agree)],
        )
        ratio = GaugeMetricFamily(
            "orchestrator_shadow_user_agreement_ratio",
            "Share of doubly labelled documents on which shadow and user labels agree",
        )
        ratio.add_metric([], agree / len(pairs) if pairs else float("nan"))
        yield ratio
        yield _counter(
            "orchestrator_offline_updates",
            "Offline-update jobs by component and outcome (published, rejected, failed)",
            ["component", "outcome"],
            updates,
        )


def _counter(
    name: str, documentation: str, labels: list[str], rows: Iterable[Sequence[Any]]
) -> CounterMetricFamily:
    """A counter family from ``rows`` of label values followed by the count."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for *values, n in rows:
        family.add_metric(values, n)
    return family


def install(app: FastAPI, generator: Callable[[], Any]) -> None:
    """Wire this router's state into the orchestrator app (called by ``app.build_app``)."""
    settings: Settings = app.state.settings
    app.state.shadow_agents = ShadowAgents(settings, generator)
    registry: CollectorRegistry | None = getattr(app.state, "metrics_registry", None)
    if registry is not None:
        registry.register(FeedbackCollector(app.state.store))
        app.state.shadow_simulations = Counter(
            "orchestrator_shadow_simulations",
            "Shadow-user simulations run, by agent",
            ["agent"],
            registry=registry,
        )


# --- routes ------------------------------------------------------------------------------------

StoreDep = Annotated[Store, Depends(from_state("store"))]
IndexDep = Annotated[IndexClient, Depends(from_state("index"))]
AgentsDep = Annotated[ShadowAgents, Depends(from_state("shadow_agents"))]

router = APIRouter()


UserIdPath = Annotated[str, Path(min_length=1, max_length=128)]


@router.put("/users/{user_id}/profile", response_model=ProfileResponse)
async def put_profile(
    user_id: UserIdPath, body: ProfileRequest, store: StoreDep
) -> ProfileResponse:
    _check_user_id(user_id)
    row = await run_in_threadpool(store.set_user_profile, user_id, body.profile)
    return ProfileResponse(**row)


@router.get(
    "/users/{user_id}/profile",
    response_model=ProfileResponse,
    responses=error_responses(ErrorCode.not_found),
)
async def get_profile(user_id: UserIdPath, store: StoreDep) -> ProfileResponse:
    _check_user_id(user_id)
    return ProfileResponse(**await run_in_threadpool(store.get_user_profile, user_id))


def _check_user_id(user_id: str) -> None:
    if not 1 <= len(user_id) <= 128:
        raise LodestarError(ErrorCode.validation, "user_id is 1-128 characters", field="user_id")


@router.post(
    "/shadow/simulate",
    response_model=ShadowResponse,
    dependencies=[Depends(require_ready)],
    responses=error_responses(ErrorCode.not_found, ErrorCode.dependency_failed),
)
async def simulate_shadow(
    body: ShadowRequest,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    index: IndexDep,
    agents: AgentsDep,
) -> ShadowResponse:
    """A shadow user judges the trace's top documents and its answer; the labels are stored as
    feedback with ``source: "shadow"``, the agent's id and its confidence, and returned."""
    trace = await run_in_threadpool(store.get_trace, body.trace_id)
    profile = body.profile
    if profile is None and body.user_id is not None:
        profile = (await run_in_threadpool(store.get_user_profile, body.user_id))["profile"]
    task = shadow.shadow_task(trace, body.top_k or settings.shadow_top_k)
    if task.ranking_stage is None and not task.answer:
        raise LodestarError(
            ErrorCode.validation,
            f"trace {body.trace_id!r} has no ranked documents and no answer to judge",
            field="trace_id",
        )
    docs: dict[str, Any] = dict(shadow.stage_texts(trace))
    missing = [d for d in dict.fromkeys([*task.doc_ids, *task.answer_doc_ids]) if d not in docs]
    if missing:
        for doc in await index.documents(task.collection, missing):
            docs[doc.id] = shadow.ShadowDoc(doc.id, doc.title, doc.text)
    name = body.agent or settings.shadow_agent
    agent = await run_in_threadpool(agents.agent, name)
    labels = await run_in_threadpool(shadow.simulate, agent, task, profile, docs)
    agent_id = agent.agent_id
    profile_key = hashlib.sha256((profile or "").encode()).hexdigest()[:16]
    stored: list[ShadowFeedback] = []
    for label in labels:
        # The same agent on the same trace and profile writes the same feedback once.
        key = hashlib.sha256(
            f"shadow|{task.trace_id}|{agent_id}|{profile_key}|{label.stage}|"
            f"{label.target_type}|{label.target_id}|{label.action}".encode()
        ).hexdigest()
        fields = dataclasses.asdict(label)
        item = FeedbackIn(
            trace_id=task.trace_id,
            source="shadow",
            agent_id=agent_id,
            idempotency_key=f"shadow:{key}",
            **fields,
        )
        feedback_id, created = await run_in_threadpool(store.add_feedback, item)
        stored.append(
            ShadowFeedback(feedback_id=feedback_id, created=created, agent_id=agent_id, **fields)
        )
    counter = getattr(request.app.state, "shadow_simulations", None)
    if counter is not None:
        counter.labels(agent=agent_id.split(":", 1)[0]).inc()
    return ShadowResponse(
        trace_id=task.trace_id,
        agent_id=agent_id,
        user_id=body.user_id,
        profile=profile,
        feedback=stored,
    )


def _filter(allowed: tuple[str, ...], max_length: int) -> Any:
    """A ``?name=`` filter the schema states as an enum ("" = no filter, as the handler reads)."""
    return Query(max_length=max_length, json_schema_extra={"enum": ["", *allowed]})


_DATE = r"[1-9][0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
_TIME = r"[T ](?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,6})?)?"
_ZONE = r"Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]"
#: ``since``: Unix seconds, or an ISO-8601 date or date-time (``feedback_export.parse_since``
#: reads both). Stated as a pattern: a ``format`` is not checked by validators by default.
#: Days stop at 28 so every date the pattern allows exists (the server reads any real date).
SINCE_PATTERN = rf"^(?:[0-9]{{1,12}}(?:\.[0-9]{{1,6}})?|{_DATE}(?:{_TIME}(?:{_ZONE})?)?)?$"


@router.get(
    "/feedback/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Training examples, one JSON object per line",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        }
    },
)
async def export_feedback(
    settings: SettingsDep,
    store: StoreDep,
    stage: Annotated[str | None, _filter(feedback_export.EXPORT_STAGES, 32)] = None,
    source: Annotated[str | None, _filter(feedback_export.SOURCES, 16)] = None,
    since: Annotated[str | None, Query(max_length=64, pattern=SINCE_PATTERN)] = None,
    type: Annotated[str | None, _filter(feedback_export.EXAMPLE_TYPES, 16)] = None,
) -> StreamingResponse:
    """Training examples derived from feedback, one JSON object per line
    (``application/x-ndjson``): ``rel_label``, ``pref_pair``, ``sft`` (see
    :mod:`services.orchestrator.feedback_export`). Filters: ``stage``, ``source``
    (``user``/``shadow``), ``since`` (Unix time or ISO-8601), ``type``."""
    stage_ = feedback_export.check_filter(stage, feedback_export.EXPORT_STAGES, "stage")
    source_ = feedback_export.check_filter(source, feedback_export.SOURCES, "source")
    type_ = feedback_export.check_filter(type, feedback_export.EXAMPLE_TYPES, "type")
    since_ = feedback_export.parse_since(since)
    examples = await run_in_threadpool(
        lambda: feedback_export.build_export(
            store,
            stage=stage_,
            source=source_,
            since=since_,
            types=None if type_ is None else [type_],
            shadow_factor=settings.shadow_weight,
        )
    )
    return StreamingResponse(
        iter(list(feedback_export.to_jsonl(examples))), media_type="application/x-ndjson"
    )


class OfflineUpdateAccepted(BaseModel):
    job_id: str
    status_url: str
    """``GET`` it for the job's state, progress and, when done, the before/after figures."""
    positive_labels: int
    queue: str


@router.post(
    "/jobs/offline-update",
    status_code=202,
    response_model=OfflineUpdateAccepted,
    responses=error_responses(ErrorCode.conflict),
)
async def offline_update(
    body: OfflineUpdateRequest,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
) -> JSONResponse:
    """Queue a fine-tune of ``component`` on exported feedback; it is published only if it
    beats the serving model on held-out queries (``GET /jobs/{id}`` gives the figures)."""
    examples = await run_in_threadpool(
        lambda: feedback_export.build_export(
            store,
            source=body.source,
            since=body.since,
            types=["rel_label"],
            shadow_factor=settings.shadow_weight,
        )
    )
    positives = sum(1 for e in examples if e["label"] == 1 and e["hard_negatives"])
    if positives < body.min_examples:
        # A valid request that meets the store's state: 409, and the same request succeeds
        # once enough feedback is in (docs/api.md, "The contract test").
        raise LodestarError(
            ErrorCode.conflict,
            f"{positives} positive relevance labels with hard negatives in the feedback"
            f"{'' if body.since is None else f' since {body.since}'}; the offline update needs "
            f"at least min_examples={body.min_examples}",
            field="min_examples",
        )
    queue = await run_in_threadpool(route_queue, celery, body.queue)
    job_id = new_id()
    params = body.model_dump(exclude={"queue"})
    params["train"] = {k: v for k, v in params["train"].items() if v is not None}
    await run_in_threadpool(
        store.record_job, job_id, TASK_OFFLINE_UPDATE, {**params, "queue": queue}
    )
    celery.send_task(TASK_OFFLINE_UPDATE, kwargs=params, task_id=job_id, queue=queue)
    return JSONResponse(
        {
            "job_id": job_id,
            "status_url": f"/jobs/{job_id}",
            "positive_labels": positives,
            "queue": queue,
        },
        status_code=202,
    )
