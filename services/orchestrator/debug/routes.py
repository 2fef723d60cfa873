"""NExT-Search's user debug mode: server-rendered pages under ``/debug``.

A thin shell like ``api.py``: every action calls the API's own handlers (``api.search``,
``api.answer``, ``api.post_feedback``, ``api.rerun_trace``, ``feedback_api.simulate_shadow``),
so the pages store, rerun and simulate exactly as ``curl`` would. Forms are plain HTML posts
answered with a redirect (the pages work without JavaScript); the vendored htmx only turns the
feedback forms into in-place updates (``HX-Request``: the target's block comes back instead).

Errors — a ``LodestarError`` from the handlers, a bad form value, a missing API key — become an
HTML page (or, for htmx, the target's block with the message) with the error's own status; a
stack trace never reaches the page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from sqlalchemy import select

from services.orchestrator import api, feedback_api
from services.orchestrator.debug import view
from services.orchestrator.rerun import trace_documents
from shared.app import SettingsDep, api_key_dependency, require_ready
from shared.errors import ErrorCode, LodestarError, invalid
from shared.store import Store, traces

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: The cookie that keeps the API key once it is given on the key page (HttpOnly, SameSite).
KEY_COOKIE = "lodestar_api_key"
#: Served from the package (vendored; docs/debug.md says which version and licence).
STATIC_FILES = {
    "htmx.min.js": "text/javascript",
    "debug.css": "text/css",
    "htmx-LICENSE.txt": "text/plain",
}
RECENT_LIMIT = 50

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.globals.update(doc_anchor=view.doc_anchor, definitions=view.SCORE_DEFINITIONS)


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


class HtmlErrorRoute(APIRoute):
    """Routes whose errors are pages: the app's handlers would answer JSON (right for the API,
    unreadable in a browser), so the debug routes catch errors before those handlers do."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def html_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except LodestarError as exc:
                if exc.code is ErrorCode.unauthorized:
                    return key_page(request, exc.message)
                return error_page(exc.status, exc.code.value, exc.message, exc.field)
            except (RequestValidationError, ValidationError) as exc:
                return error_page(422, "validation", _validation_message(exc), None)
            except Exception:  # a bug: logged with its trace, shown without it
                logger.exception("debug page failed")
                return error_page(500, "internal", "internal error; see the service log", None)

        return html_errors


def _validation_message(exc: RequestValidationError | ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def error_page(status: int, code: str, message: str, field: str | None) -> HTMLResponse:
    return render("error.html", status, code=code, message=message, field=field, http_status=status)


def key_page(request: Request, message: str | None) -> HTMLResponse:
    # Back to the page that asked for the key; a wrong key on the key form itself goes home.
    path = request.url.path
    return render("key.html", 401, message=message, next="/debug" if path == "/debug/key" else path)


# --- auth: the API's key check, with the key also accepted from the cookie ---------------------


def check_key(request: Request) -> None:
    """The API's own check (``shared.app``: SHA-256 digests, constant-time) applied to the key
    from the ``Authorization``/``X-API-Key`` headers or, for a browser, the cookie."""
    check = api_key_dependency(request.app.state.settings)
    key = request.cookies.get(KEY_COOKIE)
    if key and not request.headers.get("authorization") and not request.headers.get("x-api-key"):
        # Present the cookie's key as the header the API reads, so there is one check.
        request = Request({"type": "http", "headers": [(b"x-api-key", key.encode())]})
    check(request)


public = APIRouter(route_class=HtmlErrorRoute)
pages = APIRouter(route_class=HtmlErrorRoute, dependencies=[Depends(check_key)])


@public.get("/debug/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    media = STATIC_FILES.get(name)
    if media is None:
        raise LodestarError(ErrorCode.not_found, f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=media)


@public.get("/debug/key", include_in_schema=False)
async def key_form(request: Request) -> HTMLResponse:
    return render("key.html", message=None, next=request.query_params.get("next", "/debug"))


@public.post("/debug/key", include_in_schema=False)
async def give_key(request: Request) -> Response:
    form = await read_form(request)
    key = form.one("key")
    target = form.one("next") or "/debug"
    if not target.startswith("/debug"):
        target = "/debug"  # never redirect off the debug pages (an open redirect otherwise)
    check = api_key_dependency(request.app.state.settings)
    check(Request({"type": "http", "headers": [(b"x-api-key", key.encode())]}))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict", path="/debug")
    return response


# --- forms -------------------------------------------------------------------------------------


class Form:
    """A urlencoded form body (what browsers and htmx send), parsed without python-multipart."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def one(self, name: str, default: str = "") -> str:
        for key, value in self.pairs:
            if key == name:
                return value
        return default

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name and value]

    def integer(self, name: str, default: int | None = None) -> int | None:
        raw = self.one(name).strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise invalid(f"{name} must be a whole number, got {raw!r}", field=name) from None


async def read_form(request: Request) -> Form:
    body = (await request.body()).decode("utf-8", errors="replace")
    return Form(parse_qsl(body, keep_blank_values=True))


def trace_url(trace_id: str, anchor: str | None = None) -> str:
    return f"/debug/traces/{quote(trace_id, safe='')}" + (f"#{anchor}" if anchor else "")


StoreDep = api.StoreDep


# --- pages -------------------------------------------------------------------------------------


def recent_traces(
    store: Store, session_id: str | None, kind: str | None, limit: int = RECENT_LIMIT
) -> list[dict[str, Any]]:
    """The newest traces, optionally of one session and one kind (a listing the API lacks)."""
    query = select(
        traces.c.trace_id,
        traces.c.kind,
        traces.c.session_id,
        traces.c.parent_trace_id,
        traces.c.request,
        traces.c.created_at,
    )
    if session_id:
        query = query.where(traces.c.session_id == session_id)
    if kind:
        query = query.where(traces.c.kind == kind)
    query = query.order_by(traces.c.created_at.desc()).limit(limit)
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    for row in rows:
        request = row["request"] or {}
        row["query"] = str(request.get("query") or request.get("question") or "")
        row["from_stage"] = (request.get("rerun") or {}).get("from_stage")
    return rows


@pages.get("/debug", response_class=HTMLResponse)
async def home(request: Request, store: StoreDep) -> HTMLResponse:
    session_id = request.query_params.get("session") or None
    kind = request.query_params.get("kind") or None
    if kind not in (None, "search", "answer"):
        raise invalid("kind is search or answer", field="kind")
    rows = await run_in_threadpool(recent_traces, store, session_id, kind)
    return render("index.html", traces=rows, session=session_id or "", kind=kind or "")


@pages.post("/debug/ask")
async def ask(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    search_pipeline: api.SearchDep,
    answer_pipeline: api.AnswerDep,
) -> Response:
    """The ask box: ``/search`` or ``/answer`` through the API's handlers, then the trace."""
    require_ready(request)
    form = await read_form(request)
    metrics = api._feedback_metrics(request)  # the API's counters: a debug search counts too
    session_id = form.one("session_id").strip() or None
    collection = form.one("collection").strip() or "wiki"
    if form.one("mode", "search") == "answer":
        body = api.AnswerRequest.model_validate(
            {
                "question": form.one("query"),
                "collection": collection,
                "k": form.integer("k", 3),
                "max_rounds": form.integer("rounds"),
                "session_id": session_id,
            }
        )
        answered = await api.answer(body, settings, store, answer_pipeline, metrics)
        trace_id = str(answered.trace_id)
    else:
        searched = await api.search(
            api.SearchRequest.model_validate(
                {
                    "query": form.one("query"),
                    "collection": collection,
                    "k": form.integer("k", 10),
                    "rerank": form.one("rerank").strip() or None,
                    "session_id": session_id,
                }
            ),
            settings,
            store,
            search_pipeline,
            metrics,
        )
        trace_id = searched.trace_id
    return RedirectResponse(trace_url(trace_id), status_code=303)


@pages.get("/debug/traces/{trace_id}", response_class=HTMLResponse)
async def trace_page(trace_id: str, store: StoreDep) -> HTMLResponse:
    trace = await api.get_trace(trace_id, store)
    return render("trace.html", v=view.trace_view(trace), trace_id=trace_id)


@pages.post("/debug/traces/{trace_id}/feedback")
async def give_feedback(request: Request, trace_id: str, store: StoreDep) -> Response:
    """One feedback item on one target, stored through ``POST /feedback``'s handler."""
    form = await read_form(request)
    stage, target_type = form.one("stage"), form.one("target_type")
    target_id, action = form.one("target_id"), form.one("action")
    target = view.Target(stage, target_type, target_id, ())
    try:
        value = feedback_value(target_type, action, form)
        await store_feedback(store, trace_id, stage, target_type, target_id, action, value)
    except (LodestarError, ValidationError) as exc:
        if not is_htmx(request):
            raise
        message = exc.message if isinstance(exc, LodestarError) else _validation_message(exc)
        target.error = message
        return render("_target.html", 422, t=target, trace_id=trace_id)
    if not is_htmx(request):
        return RedirectResponse(trace_url(trace_id, target.element_id), status_code=303)
    trace = await api.get_trace(trace_id, store)
    found = view.find_target(trace, stage, target_type, target_id) or target
    return render("_target.html", t=found, trace_id=trace_id, saved=action)


async def store_feedback(
    store: Store,
    trace_id: str,
    stage: str,
    target_type: str,
    target_id: str,
    action: str,
    value: Any,
) -> None:
    """``POST /feedback``'s handler, from the page (source ``user``)."""
    body = api.FeedbackRequest.model_validate(
        {
            "trace_id": trace_id,
            "stage": stage,
            "target_type": target_type,
            "target_id": target_id,
            "action": action,
            "value": value,
        }
    )
    await api.post_feedback(body, store)


def feedback_value(target_type: str, action: str, form: Form) -> Any:
    """The ``value`` the export and the rerun overrides read for each action."""
    text = form.one("text").strip()
    if target_type == "subquery":
        if action == "edit":
            if not text:
                raise invalid(
                    "an edit cannot leave a sub-query empty; use delete to drop it",
                    field="text",
                )
            return {"text": text}
        if action == "add":
            if not text:
                raise invalid("the new sub-query is empty", field="text")
            return {"text": text, "position": form.integer("position")}
        if action == "reorder":
            position = form.integer("position")
            if position is None or position < 0:
                raise invalid("reorder needs the new position (0 = first)", field="position")
            return {"position": position}
        return None
    if action == "thumbs":
        direction = form.one("value")
        if direction not in ("up", "down"):
            raise invalid("thumbs is up or down", field="value")
        return direction
    if action == "correct_span":
        if not text:
            raise invalid("a correction needs the corrected text", field="text")
        return {"text": text}
    return None


@pages.post("/debug/traces/{trace_id}/rerun")
async def rerun(
    request: Request,
    trace_id: str,
    settings: SettingsDep,
    store: StoreDep,
    search_pipeline: api.SearchDep,
    answer_pipeline: api.AnswerDep,
) -> Response:
    """Rerun from a stage: ``POST /traces/{id}/rerun``'s handler, then parent and child side by
    side. A sub-query edited in the same form is stored as feedback first and sent as an
    override (the API decides whether a rerun can apply it)."""
    require_ready(request)
    form = await read_form(request)
    edits: list[dict[str, Any]] | None = None
    sq_id = form.one("sq_id").strip()
    if sq_id:
        value = feedback_value("subquery", "edit", form)
        await store_feedback(store, trace_id, "decompose", "subquery", sq_id, "edit", value)
        edits = [{"action": "edit", "sq_id": sq_id, "text": value["text"]}]
    sources = ["user", "shadow"] if form.one("include_shadow") else ["user"]
    body = api.RerunRequest.model_validate(
        {
            "from_stage": form.one("from_stage"),
            "apply_feedback": bool(form.one("apply_feedback")),
            "overrides": {
                "pin": form.all("pin"),
                "remove": form.all("remove"),
                "subqueries": edits,
            },
            "k": form.integer("k"),
            "feedback_sources": sources,
        }
    )
    child = await api.rerun_trace(
        trace_id,
        body,
        settings,
        store,
        search_pipeline,
        answer_pipeline,
        api._feedback_metrics(request),
    )
    return RedirectResponse(trace_url(child.trace_id) + "/compare", status_code=303)


@pages.get("/debug/traces/{trace_id}/compare", response_class=HTMLResponse)
async def compare(trace_id: str, store: StoreDep) -> HTMLResponse:
    """A rerun child beside its parent: rankings marked moved/new/gone, answers diffed."""
    child = await api.get_trace(trace_id, store)
    parent_id = child.get("parent_trace_id")
    if not parent_id:
        raise invalid(f"trace {trace_id!r} is not a rerun: it has no parent", field="trace_id")
    parent = await api.get_trace(str(parent_id), store)
    left, right = view.compare_rankings(view.ranking(parent), view.ranking(child))
    old, new = view.answer_text(parent), view.answer_text(child)
    diff = view.word_diff(old, new) if old is not None and new is not None else []
    titles = {d: h.title for d, h in trace_documents([parent, child]).items()}
    return render(
        "compare.html",
        parent=view.trace_view(parent),
        child=view.trace_view(child),
        left=left,
        right=right,
        diff=diff,
        titles=titles,
        rerun=(child.get("request") or {}).get("rerun") or {},
    )


@pages.post("/debug/traces/{trace_id}/shadow")
async def run_shadow(
    request: Request,
    trace_id: str,
    settings: SettingsDep,
    store: StoreDep,
    index: api.IndexDep,
) -> Response:
    """Run a shadow user on the trace (``POST /shadow/simulate``'s handler)."""
    require_ready(request)
    form = await read_form(request)
    body = feedback_api.ShadowRequest.model_validate(
        {
            "trace_id": trace_id,
            "profile": form.one("profile").strip() or None,
            "agent": form.one("agent") or None,
            "top_k": form.integer("top_k"),
        }
    )
    await feedback_api.simulate_shadow(
        body, request, settings, store, index, request.app.state.shadow_agents
    )
    return RedirectResponse(trace_url(trace_id, "shadow"), status_code=303)


def query_string(values: Mapping[str, str]) -> str:
    return urlencode({k: v for k, v in values.items() if v})


templates.globals.update(query_string=query_string, trace_url=trace_url)

#: What ``app.build_app`` includes: the key page and static files, then the guarded pages.
router = APIRouter()
router.include_router(public)
router.include_router(pages)
