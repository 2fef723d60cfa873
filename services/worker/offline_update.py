"""The offline-update job (NExT-Search): export feedback from the store, fine-tune the component
on it, publish iff better, record the outcome. Plain Python, so tests and the feedback
experiment run it without Celery; ``tasks.offline_update`` is the Celery shell around it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from shared.settings import Settings
from shared.store import Store, database_url

COMPONENTS = ("reranker",)


def context_rewriter(
    settings: Settings, forbidden_doc_ids: Sequence[str] | None = None
) -> Callable[[Sequence[tuple[str, str, Any]]], list[str]]:
    """CAR's context rewrite for the offline update's feedback examples, from the rewriter
    engine (cached on disk; the LLM loads on the first rewrite, so ``original`` costs nothing).
    ``forbidden_doc_ids``: documents that may not enter a prompt (an evaluation's test set)."""

    def rewrite(items: Sequence[tuple[str, str, Any]]) -> list[str]:
        from services.rewriter.engine import PairDocument, RewritePair, RewriterEngine

        pairs = [
            RewritePair(key, query, PairDocument(doc.doc_id, doc.title, doc.text))
            for key, query, doc in items
        ]
        records = RewriterEngine.from_settings(settings).rewrite_batch(
            pairs, "context", forbidden_doc_ids=forbidden_doc_ids
        )
        return [r.rewritten_query for r in records]

    return rewrite


def run_offline_update_job(
    settings: Settings,
    job_id: str,
    *,
    component: str = "reranker",
    since: float | None = None,
    min_examples: int = 8,
    eval_fraction: float = 0.25,
    min_gain: float = 0.0,
    max_p: float = 0.05,
    replay: float = 1.0,
    source: str | None = None,
    train: dict[str, Any] | None = None,
    queries: str = "original",
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run one offline update and record its outcome (``published``/``rejected``/``failed``)
    in the store; a failure is re-raised as a ``RuntimeError`` with a plain message.
    ``queries``: ``car``/``original+car`` rewrite the feedback queries first (CAR)."""
    from services.index.engine import IndexEngine
    from services.orchestrator.feedback_export import build_export
    from services.reranker.cross_encoder import CrossEncoderTrainConfig, TextDoc
    from services.reranker.offline_update import OfflineUpdateConfig, run_offline_update
    from shared.errors import LodestarError

    store = Store(database_url(settings.database_url, settings.data_dir))
    try:
        try:
            if component not in COMPONENTS:
                raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
            rows = build_export(
                store,
                source=source,
                since=since,
                types=["rel_label"],
                shadow_factor=settings.shadow_weight,
            )
            engine = IndexEngine.from_settings(settings)

            def texts(collection: str, ids: Sequence[str]) -> dict[str, TextDoc]:
                return {
                    d.id: TextDoc(d.id, d.title, d.text) for d in engine.documents(collection, ids)
                }

            config = OfflineUpdateConfig(
                min_examples=min_examples,
                eval_fraction=eval_fraction,
                min_gain=min_gain,
                max_p=max_p,
                replay=replay,
                train=CrossEncoderTrainConfig(**(train or {})),
                queries=queries,
            )
            result = run_offline_update(
                settings,
                rows,
                texts,
                config,
                rewrite=context_rewriter(settings),
                job_id=job_id,
                progress=progress,
            )
        except (LodestarError, ValueError) as exc:
            # The refusal as the API would answer it: code and field beside the message.
            failure: dict[str, Any] = (
                {"error": exc.message, "code": exc.code.value, "field": exc.field}
                if isinstance(exc, LodestarError)
                else {"error": str(exc), "code": "validation"}
            )
            store.record_offline_update(job_id, component, "failed", failure)
            raise RuntimeError(
                f"offline update of the {component} failed: {failure['error']}"
            ) from None
        except Exception as exc:
            store.record_offline_update(job_id, component, "failed", {"error": repr(exc)})
            raise
        summary = {k: v for k, v in result.items() if k not in ("before", "after")}
        summary["before"] = {k: v for k, v in result["before"].items() if k != "per_query"}
        summary["after"] = {k: v for k, v in result["after"].items() if k != "per_query"}
        store.record_offline_update(job_id, component, str(result["outcome"]), summary)
        return result
    finally:
        store.close()
