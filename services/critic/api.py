"""HTTP surface of the critic: ``POST /judge`` and what the served model is."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from services.critic.engine import CriticEngine
from shared.app import SettingsDep, check_text, from_state, require_ready
from shared.clients import JUDGE_MAX_CONTEXT_CHARS, JudgeRequest, JudgeResponse
from shared.errors import ErrorCode, LodestarError, error_responses

EngineDep = Annotated[CriticEngine, Depends(from_state("engine"))]

router = APIRouter(dependencies=[Depends(require_ready)])


@router.post("/judge", response_model=JudgeResponse, responses=error_responses(ErrorCode.empty))
async def judge(body: JudgeRequest, engine: EngineDep, settings: SettingsDep) -> JudgeResponse:
    """Accept or reject one round's answer. 503 ``unavailable`` until a critic is trained."""
    question = check_text(body.question, "question", settings)
    if len(body.context) > JUDGE_MAX_CONTEXT_CHARS:
        raise LodestarError(
            ErrorCode.too_large,
            f"context over {JUDGE_MAX_CONTEXT_CHARS} characters",
            field="context",
        )
    verdict = await run_in_threadpool(
        engine.judge, question, body.context, body.answer, body.rationale
    )
    return JudgeResponse(
        accept=verdict.accept, p_accept=verdict.p_accept, model_version=verdict.model_version
    )


@router.get("/model")
async def model(engine: EngineDep) -> dict[str, Any]:
    """The served critic version and its held-out figures (503 until one is trained)."""
    critic = await run_in_threadpool(engine.current)
    return {k: v for k, v in critic.manifest.items() if k != "files"}
