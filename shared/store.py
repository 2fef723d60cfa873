"""The system of record for traces, feedback and jobs (SQLAlchemy Core).

SQLite in WAL mode with ``synchronous=FULL`` by default (a committed row survives power loss);
PostgreSQL when ``LODESTAR_DATABASE_URL`` is set. A write returns only after its transaction has
committed, so an API that answers 201 after ``add_feedback`` has made the feedback durable.
Trace writes are group-committed: concurrent ``save_trace`` calls share one transaction (one
fsync), and each still returns only once its trace is committed.

Traces follow NExT-Search's data model: a trace has stage runs (retrieve, fusion, rerank,
generate, ...), each with inputs, outputs, the model and parameters used, its latency, and the
*targets* it produced (documents, the answer, citations) under stable ids, so feedback can point
at exactly one output of one stage.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic_core import to_json
from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from shared.errors import ErrorCode, LodestarError, not_found

metadata = MetaData()

traces = Table(
    "traces",
    metadata,
    Column("trace_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("session_id", String(64), nullable=True),
    Column("parent_trace_id", String(64), nullable=True),
    Column("request", JSON, nullable=False),
    Column("response", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_traces_parent", "parent_trace_id"),
    Index("ix_traces_session", "session_id"),
)

stage_runs = Table(
    "stage_runs",
    metadata,
    Column("stage_run_id", String(64), primary_key=True),
    Column("trace_id", String(64), ForeignKey("traces.trace_id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("stage", String(32), nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("outputs", JSON, nullable=False),
    Column("targets", JSON, nullable=False),
    Column("model_id", String(200), nullable=True),
    Column("params", JSON, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Index("ix_stage_runs_trace", "trace_id"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("feedback_id", String(64), primary_key=True),
    Column("trace_id", String(64), ForeignKey("traces.trace_id"), nullable=False),
    Column("stage", String(32), nullable=False),
    Column("target_type", String(32), nullable=False),
    Column("target_id", String(512), nullable=False),
    Column("action", String(32), nullable=False),
    Column("value", JSON, nullable=True),
    Column("source", String(16), nullable=False),
    Column("agent_id", String(128), nullable=True),
    Column("confidence", Float, nullable=True),
    Column("rationale", Text, nullable=True),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("created_at", Float, nullable=False),
    Index("ix_feedback_trace", "trace_id"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("kind", String(64), nullable=False),
    Column("params", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

TargetType = Literal["subquery", "doc", "answer", "claim", "citation"]
FeedbackSource = Literal["user", "shadow"]

#: The feedback actions per target type, after the interventions of NExT-Search's user debug mode
#: (Dai et al., SIGIR 2025): edit sub-queries, judge documents, correct or flag the answer and its
#: citations; anything else is a 422.
ACTIONS: dict[str, frozenset[str]] = {
    "subquery": frozenset({"add", "delete", "edit", "reorder"}),
    "doc": frozenset({"relevant", "irrelevant", "pin", "remove"}),
    "answer": frozenset({"thumbs", "correct_span", "flag_hallucination", "preferred_answer"}),
    "claim": frozenset({"correct_span", "flag_hallucination"}),
    "citation": frozenset({"bad_citation", "good_citation"}),
}


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class StageRun:
    stage: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    targets: list[dict[str, str]]
    model_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0
    stage_run_id: str = field(default_factory=new_id)


@dataclass
class Trace:
    kind: str
    request: dict[str, Any]
    stages: list[StageRun] = field(default_factory=list)
    response: dict[str, Any] | None = None
    session_id: str | None = None
    parent_trace_id: str | None = None
    trace_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class FeedbackIn:
    trace_id: str
    stage: str
    target_type: str
    target_id: str
    action: str
    value: Any = None
    source: str = "user"
    agent_id: str | None = None
    confidence: float | None = None
    rationale: str | None = None
    idempotency_key: str | None = None


@dataclass
class _PendingTrace:
    """A trace waiting for the group commit that writes it."""

    trace: Trace
    committed: bool = False
    done: bool = False
    error: Exception | None = None


def database_url(configured: str | None, data_dir: Path) -> str:
    if configured:
        return configured
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'lodestar.sqlite').resolve()}"


def _sqlite_durability(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()


def _insert_trace(conn: Connection, trace: Trace) -> None:
    conn.execute(
        insert(traces).values(
            trace_id=trace.trace_id,
            kind=trace.kind,
            session_id=trace.session_id,
            parent_trace_id=trace.parent_trace_id,
            request=trace.request,
            response=trace.response,
            created_at=time.time(),
        )
    )
    if trace.stages:
        conn.execute(
            insert(stage_runs),
            [
                {
                    "stage_run_id": run.stage_run_id,
                    "trace_id": trace.trace_id,
                    "seq": seq,
                    "stage": run.stage,
                    "inputs": run.inputs,
                    "outputs": run.outputs,
                    "targets": run.targets,
                    "model_id": run.model_id,
                    "params": run.params,
                    "latency_ms": run.latency_ms,
                }
                for seq, run in enumerate(trace.stages)
            ],
        )


def _json_text(value: Any) -> str:
    return to_json(value).decode()


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(
            url,
            # A file database's connections do not drop: a ping per checkout is pure cost.
            pool_pre_ping=not sqlite,
            future=True,
            # Trace stages are the bulk of every write: pydantic-core's serialiser, not json's.
            json_serializer=_json_text,
        )
        if self.engine.dialect.name == "sqlite":
            _sqlite_durability(self.engine)
        self._create_schema()
        self._trace_lock = threading.Condition()
        self._trace_queue: list[_PendingTrace] = []
        self._trace_writing = False
        self.trace_commits = 0
        """Transactions that wrote traces (fewer than traces when writes were grouped)."""

    def _create_schema(self) -> None:
        """Create missing tables. Several processes (replicas of a service) may start at once
        against one database; the loser of a creation race sees "already exists" and retries,
        and the retry's existence check then finds the winner's tables."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                return
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def close(self) -> None:
        self.engine.dispose()

    # --- traces ---------------------------------------------------------------------------------

    def save_trace(self, trace: Trace) -> str:
        """Write ``trace``; it is committed when this returns, so feedback may name it at once.

        Group commit: a caller that finds no trace write running commits every trace queued so
        far in one transaction (one fsync); callers that arrive meanwhile queue theirs and wait
        for the next one, which the first of them to wake runs. A caller runs at most one
        commit, the one holding its trace. When a grouped transaction fails, each of its traces
        is written alone, so only a bad one's caller sees the error."""
        pending = _PendingTrace(trace)
        batch: list[_PendingTrace] = []
        with self._trace_lock:
            self._trace_queue.append(pending)
            while self._trace_writing and not pending.done:
                self._trace_lock.wait()
            if not pending.done:  # still queued and no commit running: this caller runs one
                batch, self._trace_queue = self._trace_queue, []
                self._trace_writing = True
        if batch:
            try:
                self._commit_traces(batch)
            finally:
                with self._trace_lock:
                    self._trace_writing = False
                    self._trace_lock.notify_all()
        if pending.error is not None:
            raise pending.error
        return trace.trace_id

    def _commit_traces(self, batch: list[_PendingTrace]) -> None:
        try:
            try:
                with self.engine.begin() as conn:
                    for pending in batch:
                        _insert_trace(conn, pending.trace)
                self.trace_commits += 1
                for pending in batch:
                    pending.committed = True
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                for pending in batch:  # find the bad one: each written alone
                    try:
                        with self.engine.begin() as conn:
                            _insert_trace(conn, pending.trace)
                        self.trace_commits += 1
                        pending.committed = True
                    except Exception as alone:
                        pending.error = alone
        finally:
            for pending in batch:
                if not pending.committed and pending.error is None:  # interrupted
                    pending.error = RuntimeError("the trace write did not complete")
                pending.done = True

    def get_trace(self, trace_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(traces).where(traces.c.trace_id == trace_id)).mappings().first()
            )
            if row is None:
                raise not_found("trace", trace_id, field="trace_id")
            runs = conn.execute(
                select(stage_runs)
                .where(stage_runs.c.trace_id == trace_id)
                .order_by(stage_runs.c.seq)
            ).mappings()
            stages = [
                {k: v for k, v in run.items() if k not in ("trace_id", "seq")} for run in runs
            ]
            fb = conn.execute(
                select(feedback)
                .where(feedback.c.trace_id == trace_id)
                .order_by(feedback.c.created_at)
            ).mappings()
            children = conn.execute(
                select(traces.c.trace_id)
                .where(traces.c.parent_trace_id == trace_id)
                .order_by(traces.c.created_at)
            ).all()
            return {
                **dict(row),
                "stages": stages,
                "feedback": [dict(f) for f in fb],
                "children": [str(c[0]) for c in children],
            }

    def children(self, trace_id: str) -> list[str]:
        """Traces rerun from ``trace_id`` (their ``parent_trace_id``), oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(traces.c.trace_id)
                .where(traces.c.parent_trace_id == trace_id)
                .order_by(traces.c.created_at)
            ).all()
        return [str(r[0]) for r in rows]

    def session_traces(
        self, session_id: str, *, with_feedback: bool = True, limit: int = 50
    ) -> list[str]:
        """The session's traces (those with feedback when ``with_feedback``), oldest first, at
        most the ``limit`` most recent ones."""
        query = select(traces.c.trace_id, traces.c.created_at).where(
            traces.c.session_id == session_id
        )
        if with_feedback:
            query = query.where(traces.c.trace_id.in_(select(feedback.c.trace_id).distinct()))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(traces.c.created_at.desc()).limit(limit)).all()
        return [str(r[0]) for r in reversed(rows)]

    # --- feedback -------------------------------------------------------------------------------

    def add_feedback(self, item: FeedbackIn) -> tuple[str, bool]:
        """Store feedback durably; returns (feedback_id, created). A repeated idempotency key
        returns the first feedback's id and ``created=False``."""
        if item.idempotency_key:
            existing = self._feedback_by_key(item.idempotency_key)
            if existing is not None:
                return existing, False
        allowed = ACTIONS.get(item.target_type)
        if allowed is None:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown target_type {item.target_type!r}",
                field="target_type",
            )
        if item.action not in allowed:
            raise LodestarError(
                ErrorCode.validation,
                f"action {item.action!r} does not apply to a {item.target_type}; "
                f"expected one of {sorted(allowed)}",
                field="action",
            )
        feedback_id = new_id()
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(
                    select(traces.c.trace_id).where(traces.c.trace_id == item.trace_id)
                ).first()
                if exists is None:
                    raise not_found("trace", item.trace_id, field="trace_id")
                runs = conn.execute(
                    select(stage_runs.c.targets).where(
                        stage_runs.c.trace_id == item.trace_id, stage_runs.c.stage == item.stage
                    )
                ).all()
                if not runs:
                    raise not_found(f"stage in trace {item.trace_id}:", item.stage, field="stage")
                known = {(t["type"], t["id"]) for (targets,) in runs for t in targets}
                if (item.target_type, item.target_id) not in known:
                    raise not_found(
                        f"{item.target_type} in stage {item.stage}:",
                        item.target_id,
                        field="target_id",
                    )
                conn.execute(
                    insert(feedback).values(
                        feedback_id=feedback_id,
                        trace_id=item.trace_id,
                        stage=item.stage,
                        target_type=item.target_type,
                        target_id=item.target_id,
                        action=item.action,
                        value=item.value,
                        source=item.source,
                        agent_id=item.agent_id,
                        confidence=item.confidence,
                        rationale=item.rationale,
                        idempotency_key=item.idempotency_key,
                        created_at=time.time(),
                    )
                )
        except IntegrityError:
            # A concurrent request with the same idempotency key won the race: return its id.
            if item.idempotency_key:
                existing = self._feedback_by_key(item.idempotency_key)
                if existing is not None:
                    return existing, False
            raise
        return feedback_id, True

    def _feedback_by_key(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(feedback.c.feedback_id).where(feedback.c.idempotency_key == key)
            ).first()
        return None if row is None else str(row[0])

    # --- jobs -----------------------------------------------------------------------------------

    def record_job(self, job_id: str, kind: str, params: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(jobs).values(job_id=job_id, kind=kind, params=params, created_at=time.time())
            )

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.job_id == job_id)).mappings().first()
        if row is None:
            raise not_found("job", job_id)
        return dict(row)

    # --- user profiles, feedback listing, offline updates (NExT-Search shadow mode and export) --

    def set_user_profile(self, user_id: str, profile: str) -> dict[str, Any]:
        """Create or replace the profile text that conditions ``user_id``'s shadow agent."""
        now = time.time()
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    changed = conn.execute(
                        user_profiles.update()
                        .where(user_profiles.c.user_id == user_id)
                        .values(profile=profile, updated_at=now)
                    ).rowcount
                    if not changed:
                        conn.execute(
                            insert(user_profiles).values(
                                user_id=user_id, profile=profile, updated_at=now
                            )
                        )
                break
            except IntegrityError:
                # A concurrent first write for the same user won: the retry updates its row.
                if attempt == 1:
                    raise
        return {"user_id": user_id, "profile": profile, "updated_at": now}

    def get_user_profile(self, user_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(user_profiles).where(user_profiles.c.user_id == user_id))
                .mappings()
                .first()
            )
        if row is None:
            raise not_found("user profile", user_id, field="user_id")
        return dict(row)

    def list_feedback(
        self,
        *,
        stage: str | None = None,
        source: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """Feedback rows (oldest first), optionally of one stage, one source, created at or
        after ``since`` (a Unix time)."""
        query = select(feedback)
        if stage is not None:
            query = query.where(feedback.c.stage == stage)
        if source is not None:
            query = query.where(feedback.c.source == source)
        if since is not None:
            query = query.where(feedback.c.created_at >= since)
        query = query.order_by(feedback.c.created_at, feedback.c.feedback_id)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def feedback_counts(self) -> list[tuple[str, str, int]]:
        """(stage, source, count) over all stored feedback (the metrics collector's view)."""
        from sqlalchemy import func

        query = select(feedback.c.stage, feedback.c.source, func.count()).group_by(
            feedback.c.stage, feedback.c.source
        )
        with self.engine.connect() as conn:
            return [(str(s), str(src), int(n)) for s, src, n in conn.execute(query)]

    def doc_label_pairs(self) -> list[tuple[str, str]]:
        """For every document of a trace labelled relevant/irrelevant by both a user and a
        shadow agent: (user label, shadow label), each source's latest label."""
        query = (
            select(
                feedback.c.trace_id,
                feedback.c.target_id,
                feedback.c.source,
                feedback.c.action,
            )
            .where(
                feedback.c.target_type == "doc",
                feedback.c.action.in_(("relevant", "irrelevant")),
            )
            .order_by(feedback.c.created_at)
        )
        latest: dict[tuple[str, str], dict[str, str]] = {}
        with self.engine.connect() as conn:
            for trace_id, doc_id, source, action in conn.execute(query):
                latest.setdefault((trace_id, doc_id), {})[source] = action
        return [
            (labels["user"], labels["shadow"])
            for labels in latest.values()
            if "user" in labels and "shadow" in labels
        ]

    def record_offline_update(
        self,
        job_id: str,
        component: str,
        outcome: str,
        result: dict[str, Any],
    ) -> None:
        """The outcome (``published``, ``rejected``, ``failed``) of one offline-update job; a
        redelivered job replaces its earlier record."""
        with self.engine.begin() as conn:
            conn.execute(offline_updates.delete().where(offline_updates.c.job_id == job_id))
            conn.execute(
                insert(offline_updates).values(
                    job_id=job_id,
                    component=component,
                    outcome=outcome,
                    result=result,
                    created_at=time.time(),
                )
            )

    def offline_update_counts(self) -> list[tuple[str, str, int]]:
        """(component, outcome, count) of recorded offline-update jobs."""
        from sqlalchemy import func

        query = select(
            offline_updates.c.component, offline_updates.c.outcome, func.count()
        ).group_by(offline_updates.c.component, offline_updates.c.outcome)
        with self.engine.connect() as conn:
            return [(str(c), str(o), int(n)) for c, o, n in conn.execute(query)]


#: The profile text that conditions a user's shadow agent (NExT-Search's ``UserProfile``).
user_profiles = Table(
    "user_profiles",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("profile", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: One row per offline-update job: its outcome and figures (what /metrics counts).
offline_updates = Table(
    "offline_updates",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("component", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("result", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)
