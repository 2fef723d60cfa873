"""NExT-Search's shadow user mode: a user agent, conditioned on a profile, labels a trace's
documents and answer the way that user would, as synthetic feedback with provenance.

Agents (plain Python, pluggable; :func:`make_agent` builds one by name):

- ``llm``: SmolLM2 prompted with the profile, the query and one passage, asked "yes or no";
  the label is ``relevant`` when P(yes) ≥ ``threshold``, where P(yes) is the softmax over the
  next-token logits of the yes-tokens against the no-tokens (``Yes``, `` yes``, ... summed).
  It also judges answers (thumbs up/down) from the question, the answer and its cited passages.
- ``cross-encoder``: the published cross-encoder (the CAR/offline-update ranker); P(relevant) is
  the sigmoid of its logit (it is trained with a pointwise/listwise loss on 0/1 labels, so the
  logit is at least monotone in relevance). The profile is **ignored**: the ranker was trained
  on plain queries, and a profile prefix would put its inputs out of distribution. It does not
  judge answers (a relevance ranker has no notion of a correct answer).
- ``both``: the mean of the two probabilities for documents, the LLM alone for answers.
- ``auto`` (default): the cross-encoder for documents and the LLM for answers when a
  cross-encoder is published, else ``llm``. First look (4 Wikipedia summaries, 2 queries):
  SmolLM2-135M's P(yes) barely separates a relevant passage from an unrelated one (0.29 for the
  Mona Lisa article on "Who painted the Mona Lisa?" vs 0.14-0.39 for the others), and costs one
  LM pass per document; a trained ranker at least orders documents. The measurement that
  settles it (Cohen's κ against SciFact qrels) is ``lodestar experiment feedback``'s, which
  calls :func:`judge_documents` in process.

``max_relevant`` (documents): at most that many of one trace's documents are labelled relevant,
the most probable ones above the threshold, as a user marks the one or two results that answer
them rather than every passable one; ``None`` labels by the threshold alone.

Every judgement carries the agent's ``agent_id`` (agent, model and version) and a
``confidence`` (the probability of the label it chose), so shadow feedback is never mistaken
for, or mixed with, a user's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from shared.errors import ErrorCode, LodestarError

AgentName = Literal["auto", "llm", "cross-encoder", "both"]
AGENTS: tuple[str, ...] = ("auto", "llm", "cross-encoder", "both")
#: Stages whose outputs are rankings, latest-first preference for the one a shadow user sees.
RANKING_STAGES: tuple[str, ...] = ("rerank", "fusion", "retrieve")
PASSAGE_CHARS = 700


class DocLike(Protocol):
    @property
    def doc_id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class ShadowDoc:
    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class Judgement:
    label: str
    """``relevant``/``irrelevant`` for documents, ``up``/``down`` for answers."""
    confidence: float
    """The probability the agent gives its own label (0.5 … 1)."""
    p_positive: float
    """P(relevant) or P(good answer)."""


class RelevanceScorer(Protocol):
    """A (query, document) relevance model returning logits, e.g. the published cross-encoder."""

    @property
    def model_id(self) -> str: ...
    def score(self, query: str, docs: Sequence[DocLike]) -> list[float]: ...


class ShadowAgent(Protocol):
    @property
    def agent_id(self) -> str: ...
    def judge_documents(
        self, profile: str | None, query: str, docs: Sequence[DocLike]
    ) -> list[Judgement]: ...
    def judge_answer(
        self, profile: str | None, question: str, answer: str, docs: Sequence[DocLike]
    ) -> Judgement | None: ...


def relevant_mask(
    probabilities: Sequence[float], threshold: float, max_relevant: int | None = None
) -> list[bool]:
    """Which documents an agent labels relevant: P ≥ ``threshold``, and among the
    ``max_relevant`` most probable (earlier documents first among equal P)."""
    above = [p >= threshold for p in probabilities]
    if max_relevant is None:
        return above
    ranked = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])
    top = set(ranked[:max_relevant])
    return [a and i in top for i, a in enumerate(above)]


def _judgement(p: float, positive: bool, labels: tuple[str, str]) -> Judgement:
    return Judgement(
        label=labels[0] if positive else labels[1],
        confidence=round(p if positive else 1.0 - p, 4),
        p_positive=round(p, 4),
    )


def _passage(doc: DocLike, chars: int = PASSAGE_CHARS) -> str:
    text = doc.text if len(doc.text) <= chars else doc.text[:chars].rsplit(" ", 1)[0] + " ..."
    return f"{doc.title}: {text}" if doc.title else text


def _persona(profile: str | None) -> str:
    who = profile.strip() if profile and profile.strip() else "a typical web search user"
    return (
        "You simulate one search engine user and judge results exactly as this user would. "
        f"The user: {who}"
    )


def document_messages(profile: str | None, query: str, doc: DocLike) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": _persona(profile)},
        {
            "role": "user",
            "content": (
                f"The user searched for: {query}\n\nPassage:\n{_passage(doc)}\n\n"
                "Is this passage relevant to what the user searched for? Answer yes or no."
            ),
        },
    ]


def answer_messages(
    profile: str | None, question: str, answer: str, docs: Sequence[DocLike]
) -> list[dict[str, str]]:
    sources = "\n".join(f"[{i}] {_passage(d, 400)}" for i, d in enumerate(docs, 1)) or "(none)"
    return [
        {"role": "system", "content": _persona(profile)},
        {
            "role": "user",
            "content": (
                f"The user asked: {question}\n\nSources:\n{sources}\n\nThe system answered: "
                f"{answer}\n\nIs this a correct and useful answer for the user? Answer yes or no."
            ),
        },
    ]


class _ProbabilityAgent:
    """Labels documents by the agent's P(relevant) against ``threshold``; a subclass gives
    ``document_probabilities``."""

    threshold: float
    max_relevant: int | None = None

    def document_probabilities(
        self, profile: str | None, query: str, docs: Sequence[DocLike]
    ) -> list[float]:
        raise NotImplementedError

    def judge_documents(
        self, profile: str | None, query: str, docs: Sequence[DocLike]
    ) -> list[Judgement]:
        probabilities = self.document_probabilities(profile, query, docs)
        mask = relevant_mask(probabilities, self.threshold, self.max_relevant)
        return [
            _judgement(p, positive, ("relevant", "irrelevant"))
            for p, positive in zip(probabilities, mask, strict=True)
        ]


class LlmAgent(_ProbabilityAgent):
    """SmolLM2 (any chat causal LM with ``prompt_ids``) asked yes/no per passage."""

    def __init__(self, generator: Any, *, threshold: float = 0.5, batch_size: int = 5) -> None:
        self.generator = generator  # shared.models.Generator: .model, .tokenizer, .prompt_ids
        self.threshold = threshold
        self.batch_size = batch_size
        tokenizer = generator.tokenizer
        self._yes = _first_token_ids(tokenizer, ("yes", "Yes", " yes", " Yes", "YES"))
        self._no = _first_token_ids(tokenizer, ("no", "No", " no", " No", "NO"))

    @property
    def agent_id(self) -> str:
        return f"shadow-llm:{self.generator.model_id}"

    def p_yes(self, messages: Sequence[dict[str, str]]) -> float:
        return self.p_yes_batch([messages])[0]

    def p_yes_batch(self, prompts: Sequence[Sequence[dict[str, str]]]) -> list[float]:
        """P(yes) for each prompt, ``batch_size`` prompts per forward pass (left-padded, with
        positions counted from each prompt's first real token, so padding changes nothing)."""
        import torch

        out: list[float] = []
        pad = self.generator.tokenizer.pad_token_id
        pad = self.generator.tokenizer.eos_token_id if pad is None else pad
        for start in range(0, len(prompts), self.batch_size):
            rows = [
                self.generator.prompt_ids(m)[0] for m in prompts[start : start + self.batch_size]
            ]
            width = max(int(r.shape[0]) for r in rows)
            ids = torch.full((len(rows), width), int(pad), dtype=rows[0].dtype)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - row.shape[0] :] = row
                mask[i, width - row.shape[0] :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            device = rows[0].device
            inputs = {"input_ids": ids.to(device)}
            if len({int(r.shape[0]) for r in rows}) > 1:  # padding: mask it, count positions
                inputs.update(attention_mask=mask.to(device), position_ids=positions.to(device))
            with torch.inference_mode():
                logits = self.generator.model(**inputs).logits[:, -1].float()
            yes = torch.logsumexp(logits[:, self._yes], dim=-1)
            no = torch.logsumexp(logits[:, self._no], dim=-1)
            out.extend(float(p) for p in torch.sigmoid(yes - no).tolist())
        return out

    def document_probabilities(
        self, profile: str | None, query: str, docs: Sequence[DocLike]
    ) -> list[float]:
        return self.p_yes_batch([document_messages(profile, query, doc) for doc in docs])

    def judge_answer(
        self, profile: str | None, question: str, answer: str, docs: Sequence[DocLike]
    ) -> Judgement | None:
        p = self.p_yes(answer_messages(profile, question, answer, docs))
        return _judgement(p, p >= self.threshold, ("up", "down"))


def _first_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


class CrossEncoderAgent(_ProbabilityAgent):
    """The published cross-encoder; the profile is ignored (see the module docstring)."""

    def __init__(
        self, scorer: RelevanceScorer, *, threshold: float = 0.5, max_relevant: int | None = None
    ) -> None:
        self.scorer = scorer
        self.threshold = threshold
        self.max_relevant = max_relevant

    @property
    def agent_id(self) -> str:
        return f"shadow-ce:{self.scorer.model_id}"

    def document_probabilities(
        self, profile: str | None, query: str, docs: Sequence[DocLike]
    ) -> list[float]:
        if not docs:
            return []
        return [_sigmoid(s) for s in self.scorer.score(query, docs)]

    def judge_answer(
        self, profile: str | None, question: str, answer: str, docs: Sequence[DocLike]
    ) -> Judgement | None:
        return None


class CombinedAgent(_ProbabilityAgent):
    """Documents by ``llm_weight`` × the LLM's P(relevant) + the rest × the cross-encoder's
    (``both``: 0.5; ``auto``: 0, the LLM then only judges answers); answers by the LLM."""

    def __init__(
        self,
        llm: LlmAgent,
        cross_encoder: CrossEncoderAgent,
        threshold: float = 0.5,
        *,
        llm_weight: float = 0.5,
    ) -> None:
        self.llm = llm
        self.cross_encoder = cross_encoder
        self.threshold = threshold
        self.llm_weight = llm_weight

    @property
    def agent_id(self) -> str:
        ce = self.cross_encoder.scorer.model_id
        if self.llm_weight == 0:
            return f"shadow-ce:{ce}+answers:{self.llm.generator.model_id}"
        return f"shadow-both:{self.llm.generator.model_id}+{ce}"

    def document_probabilities(
        self, profile: str | None, query: str, docs: Sequence[DocLike]
    ) -> list[float]:
        b = self.cross_encoder.document_probabilities(profile, query, docs)
        if self.llm_weight == 0:
            return b
        a = self.llm.document_probabilities(profile, query, docs)
        w = self.llm_weight
        return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]

    def judge_answer(
        self, profile: str | None, question: str, answer: str, docs: Sequence[DocLike]
    ) -> Judgement | None:
        return self.llm.judge_answer(profile, question, answer, docs)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def judge_documents(
    agent: ShadowAgent, profile: str | None, query: str, docs: Sequence[DocLike]
) -> list[tuple[str, float]]:
    """(label, confidence) per document, in order: the in-process entry point for experiments."""
    return [(j.label, j.confidence) for j in agent.judge_documents(profile, query, docs)]


def unavailable(what: str) -> LodestarError:
    return LodestarError(ErrorCode.unavailable, what, field="agent", retry_after_s=60)


def make_agent(
    name: str,
    *,
    generator: Callable[[], Any],
    scorer: Callable[[], RelevanceScorer | None],
    llm_threshold: float = 0.5,
    ce_threshold: float = 0.5,
    max_relevant: int | None = None,
) -> ShadowAgent:
    """Build agent ``name``. ``generator()`` returns the chat LM; ``scorer()`` the published
    cross-encoder or None when none is published (then ``cross-encoder``/``both`` raise a typed
    503 and ``auto`` falls back to ``llm``). ``max_relevant`` caps the cross-encoder's (and
    ``auto``'s) relevant labels per trace."""
    if name not in AGENTS:
        raise LodestarError(
            ErrorCode.validation,
            f"unknown shadow agent {name!r}; expected one of {', '.join(AGENTS)}",
            field="agent",
        )
    ce: RelevanceScorer | None = None
    if name in ("cross-encoder", "both", "auto"):
        ce = scorer()
        if ce is None and name != "auto":
            raise unavailable(
                f"shadow agent {name!r} needs a published cross-encoder and none is published; "
                "run an offline update (POST /jobs/offline-update) or the CAR experiment first"
            )
    if name == "cross-encoder":
        assert ce is not None
        return CrossEncoderAgent(ce, threshold=ce_threshold, max_relevant=max_relevant)
    try:
        llm = LlmAgent(generator(), threshold=llm_threshold)
    except LodestarError:
        raise
    except Exception as exc:  # the LM is missing or failed to load
        raise unavailable(f"the shadow agent's language model is not available: {exc}") from exc
    if ce is None:
        return llm
    combined = CombinedAgent(
        llm,
        CrossEncoderAgent(ce, threshold=ce_threshold),
        ce_threshold if name == "auto" else 0.5,
        llm_weight=0.0 if name == "auto" else 0.5,
    )
    if name == "auto":  # documents by the cross-encoder alone: its cap applies
        combined.max_relevant = max_relevant
    return combined


# --- what a trace offers a shadow user ---------------------------------------------------------


@dataclass(frozen=True)
class ShadowTask:
    """What the agent is asked about one trace."""

    trace_id: str
    query: str
    collection: str
    ranking_stage: str | None
    doc_ids: list[str]
    answer: str | None
    answer_doc_ids: list[str]


def last_ranking(trace: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """(stage, doc ids best first) of the trace's last ranking stage with hits."""
    for run in reversed(trace.get("stages", [])):
        if run["stage"] in RANKING_STAGES:
            hits = (run.get("outputs") or {}).get("hits")
            if hits:
                ordered = sorted(hits, key=lambda h: h.get("rank", 0))
                return run["stage"], [str(h["doc_id"]) for h in ordered]
    return None


def shadow_task(trace: Mapping[str, Any], top_k: int) -> ShadowTask:
    request = trace.get("request") or {}
    query = str(request.get("query") or request.get("question") or "")
    ranking = last_ranking(trace)
    stage, doc_ids = ranking if ranking is not None else (None, [])
    answer: str | None = None
    answer_doc_ids: list[str] = []
    if trace.get("kind") == "answer":
        generations = [r for r in trace.get("stages", []) if r["stage"] == "generate"]
        response = trace.get("response") or {}
        if generations:
            last = generations[-1].get("outputs") or {}
            answer = str(response.get("answer") or last.get("answer") or "") or None
            cited = [c.get("doc_id") for c in response.get("citations") or [] if c]
            answer_doc_ids = [str(d) for d in cited if d] or [
                str(d) for d in last.get("citations") or []
            ]
    return ShadowTask(
        trace_id=str(trace["trace_id"]),
        query=query,
        collection=str(request.get("collection") or "wiki"),
        ranking_stage=stage,
        doc_ids=doc_ids[:top_k],
        answer=answer,
        answer_doc_ids=answer_doc_ids,
    )


def stage_texts(trace: Mapping[str, Any]) -> dict[str, ShadowDoc]:
    """Document texts a trace already holds (stage outputs that carry ``title``/``text``: the
    retrieve lists, ``""`` past the ``text_k`` the index was asked with, and ``lookup`` stages'
    documents); an empty text is not one, so the caller looks that document up."""
    found: dict[str, ShadowDoc] = {}
    for run in trace.get("stages", []):
        outputs = run.get("outputs") or {}
        for hit in [*(outputs.get("hits") or []), *(outputs.get("documents") or [])]:
            if isinstance(hit, dict) and hit.get("text") and hit.get("doc_id") not in found:
                doc_id = str(hit["doc_id"])
                found[doc_id] = ShadowDoc(doc_id, str(hit.get("title") or ""), str(hit["text"]))
    return found


@dataclass(frozen=True)
class ShadowLabel:
    """One piece of shadow feedback, ready for ``Store.add_feedback``."""

    stage: str
    target_type: str
    target_id: str
    action: str
    value: Any
    confidence: float
    rationale: str


def simulate(
    agent: ShadowAgent,
    task: ShadowTask,
    profile: str | None,
    docs: Mapping[str, DocLike],
) -> list[ShadowLabel]:
    """The agent's labels on the task's documents (``relevant``/``irrelevant``) and answer
    (``thumbs`` with value ``up``/``down``). Documents without text are skipped."""
    labels: list[ShadowLabel] = []
    judged = [docs[d] for d in task.doc_ids if d in docs]
    if task.ranking_stage is not None and judged:
        for doc, j in zip(judged, agent.judge_documents(profile, task.query, judged), strict=True):
            labels.append(
                ShadowLabel(
                    stage=task.ranking_stage,
                    target_type="doc",
                    target_id=doc.doc_id,
                    action=j.label,
                    value={"p_relevant": j.p_positive},
                    confidence=j.confidence,
                    rationale=f"P(relevant)={j.p_positive:.3f}",
                )
            )
    if task.answer:
        cited = [docs[d] for d in task.answer_doc_ids if d in docs]
        verdict = agent.judge_answer(profile, task.query, task.answer, cited)
        if verdict is not None:
            labels.append(
                ShadowLabel(
                    stage="generate",
                    target_type="answer",
                    target_id="answer",
                    action="thumbs",
                    value=verdict.label,
                    confidence=verdict.confidence,
                    rationale=f"P(good answer)={verdict.p_positive:.3f}",
                )
            )
    return labels
