"""ICR and its baselines on a tiny random-init Llama (2 layers, SmolLM2's tokenizer and chat
template): spans against the tokenizer, attention aggregation against ``output_attentions=True``,
calibration against hand-computed tensors, cache reuse against two full passes, RankGPT parsing,
and the orchestrator's rerank stage and fallback with fake clients."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.orchestrator.search import SearchPipeline
from services.reranker.engine import (
    RankGPTOptions,
    RankGPTRanker,
    RerankDocument,
    RerankerEngine,
    parse_permutation,
    rankgpt_messages,
    sliding_windows,
)
from services.reranker.icr import (
    INSTRUCTIONS,
    ICRInputError,
    ICROptions,
    ICRScorer,
    build_prompt,
    masked_na_scores,
)
from shared.clients import (
    DependencyError,
    RerankRequest,
    RerankResponse,
)
from shared.errors import LodestarError
from shared.schemas import Hit, IndexSearchRequest, IndexSearchResponse
from shared.store import Trace
from tests.conftest import make_settings
from tests.scripted import ReversingReranker

TRICKY_DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "   leading spaces and a trailing one ",
    "Café — naïve 日本語 テスト with émojis 🎉 and ∑ maths.",
    "x",
    "Isaac Newton formulated the laws of motion and universal gravitation. " * 40,
    "Line one.\n\nLine two after a blank line.\ttab",
]
QUERY = "Who formulated the laws of gravity?"


@pytest.fixture(scope="module")
def llm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared.models import prepare_llm

    return prepare_llm(make_settings(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def tokenizer(llm_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_path)


def tiny_model(llm_path: Path, attn: str, seed: int = 0) -> Any:
    """SmolLM2's config with 2 layers and small widths (GQA kept: 4 heads, 2 KV heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(llm_path)
    config.num_hidden_layers = 2
    config.hidden_size = 64
    config.intermediate_size = 128
    config.num_attention_heads = 4
    config.num_key_value_heads = 2
    config.head_dim = 16
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="module")
def scorer(llm_path: Path, tokenizer: Any) -> ICRScorer:
    return ICRScorer(tiny_model(llm_path, "sdpa"), tokenizer)


# --- spans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["reverse", "input"])
def test_spans_decode_back_to_each_document(tokenizer: Any, order: str) -> None:
    options = ICROptions(doc_order=order, max_doc_tokens=64)  # type: ignore[arg-type]
    prompt = build_prompt(tokenizer, QUERY, TRICKY_DOCS, options)
    for index, (start, end) in enumerate(prompt.doc_spans):
        decoded = tokenizer.decode(prompt.input_ids[start:end])
        assert decoded.strip() == prompt.doc_texts[index].strip()
        assert prompt.doc_texts[index] in TRICKY_DOCS[index]
        assert end - start <= 64 + 1  # budget, plus at most the token merging the space
    assert prompt.doc_texts[1] == "leading spaces and a trailing one"
    assert prompt.doc_texts[3] == "x" and prompt.doc_spans[3][1] - prompt.doc_spans[3][0] == 1
    # The long document was cut to its head, on a token boundary.
    assert prompt.truncated == 1 and TRICKY_DOCS[4].startswith(prompt.doc_texts[4])
    # Spans are disjoint and in prompt order; the query span starts at the instruction.
    ordered = sorted(prompt.doc_spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered))
    prompt_first = prompt.doc_spans[prompt.prompt_order[0]]
    assert prompt_first == ordered[0]
    tail = tokenizer.decode(prompt.input_ids[prompt.query_span[0] :])
    assert tail.startswith(INSTRUCTIONS["ie"]) and QUERY in tail
    assert prompt.query_span[1] == len(prompt.input_ids)
    assert prompt.prefix_len == prompt.query_span[0] > ordered[-1][1]


def test_reverse_order_puts_the_first_document_nearest_the_query(tokenizer: Any) -> None:
    prompt = build_prompt(tokenizer, QUERY, ["first", "second", "third"], ICROptions())
    assert prompt.prompt_order == [2, 1, 0]
    assert prompt.doc_spans[0][0] > prompt.doc_spans[1][0] > prompt.doc_spans[2][0]
    text = tokenizer.decode(prompt.input_ids)
    assert text.index("[1] third") < text.index("[3] first") < text.index("Query:")


def test_raw_query_span_option_decodes_to_the_query(tokenizer: Any) -> None:
    prompt = build_prompt(
        tokenizer, " ünïcode query? ", TRICKY_DOCS[:3], ICROptions(query_span="query")
    )
    start, end = prompt.query_span
    assert tokenizer.decode(prompt.input_ids[start:end]).strip() == "ünïcode query?".strip()
    assert end < len(prompt.input_ids)  # the template's assistant header follows


def test_prompt_budget_shrinks_documents_to_an_equal_share(tokenizer: Any) -> None:
    docs = ["word " * 400] * 10
    prompt = build_prompt(
        tokenizer, QUERY, docs, ICROptions(max_doc_tokens=300, max_prompt_tokens=1024)
    )
    assert len(prompt.input_ids) <= 1024
    assert prompt.doc_budget < 300 and prompt.truncated == 10
    with pytest.raises(ICRInputError):
        build_prompt(tokenizer, QUERY, docs * 20, ICROptions(max_prompt_tokens=1024))


# --- attention --------------------------------------------------------------------------------


def direct_attention(
    model: Any, ids: list[int], rows: tuple[int, int], layers: list[int]
) -> torch.Tensor:
    """The reference: full eager attention tensors, query rows averaged, heads and layers summed."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    total = torch.zeros(len(ids), dtype=torch.float64)
    for layer in layers:
        weights = out.attentions[layer][0].double()  # (H, T, T)
        total += weights[:, rows[0] : rows[1], :].mean(dim=1).sum(dim=0)
    return total


@pytest.mark.parametrize(
    ("layers", "query_tokens"), [("all", "span"), ("last", "span"), ("all", "last")]
)
def test_hooked_attention_matches_output_attentions(
    llm_path: Path, tokenizer: Any, layers: str, query_tokens: str
) -> None:
    eager = tiny_model(llm_path, "eager", seed=1)
    sdpa = tiny_model(llm_path, "sdpa", seed=1)
    sdpa.load_state_dict(eager.state_dict())
    options = ICROptions(calibration="none", layers=layers, query_tokens=query_tokens)  # type: ignore[arg-type]
    prompt = build_prompt(tokenizer, QUERY, TRICKY_DOCS[:4], options)
    hooked, _, passes, computed = ICRScorer(sdpa, tokenizer).attention(
        prompt, prompt.input_ids, options, na_ids=None
    )
    assert passes == 1 and computed == len(prompt.input_ids)
    rows = (
        prompt.query_span
        if query_tokens == "span"
        else (len(prompt.input_ids) - 1, len(prompt.input_ids))
    )
    expected = direct_attention(eager, prompt.input_ids, rows, [0, 1] if layers == "all" else [1])
    assert torch.allclose(hooked.double(), expected, atol=1e-5, rtol=1e-4)
    # Per query row, each head's attention sums to one over the columns.
    assert float(hooked.sum()) == pytest.approx(4 * (2 if layers == "all" else 1), rel=1e-4)


@pytest.mark.parametrize("query_span", ["instruction", "query"])
def test_cache_reuse_gives_the_scores_of_two_independent_passes(
    scorer: ICRScorer, query_span: str
) -> None:
    options = ICROptions(max_doc_tokens=48, query_span=query_span)  # type: ignore[arg-type]
    reused = scorer.score(QUERY, TRICKY_DOCS, options)
    independent = scorer.score(QUERY, TRICKY_DOCS, replace(options, reuse_cache=False))
    assert reused.forward_passes == independent.forward_passes == 2
    assert reused.computed_tokens < independent.computed_tokens  # documents encoded once
    np.testing.assert_allclose(reused.scores, independent.scores, rtol=1e-4, atol=1e-6)
    assert all(np.isfinite(reused.scores))


def test_score_is_masked_na_calibration_of_the_two_passes(scorer: ICRScorer) -> None:
    options = ICROptions(max_doc_tokens=48)
    result = scorer.score(QUERY, TRICKY_DOCS[:3], options)
    prompt = result.prompt
    na_prompt = scorer.build("N/A", TRICKY_DOCS[:3], options)
    q_att, na_att, _, _ = scorer.attention(
        prompt, prompt.input_ids, options, na_ids=na_prompt.input_ids
    )
    assert na_att is not None
    for index, (start, end) in enumerate(prompt.doc_spans):
        assert result.scores[index] == pytest.approx(
            masked_na_scores(q_att[start:end], na_att[start:end])
        )
    uncalibrated = scorer.score(
        QUERY, TRICKY_DOCS[:3], ICROptions(max_doc_tokens=48, calibration="none")
    )
    assert uncalibrated.forward_passes == 1
    for index, (start, end) in enumerate(prompt.doc_spans):
        assert uncalibrated.scores[index] == pytest.approx(float(q_att[start:end].sum()), rel=1e-4)


def test_a_long_query_shrinks_both_prompts_alike(scorer: ICRScorer) -> None:
    """The per-document share depends on the query's length; the N/A prompt takes the query
    prompt's budget, so both keep one document prefix (a fuzzed long query once found them
    apart)."""
    options = ICROptions(max_doc_tokens=160, max_prompt_tokens=600)
    long_query = "which " + "very " * 150 + "long question?"
    docs = ["word " * 400] * 3
    result = scorer.score(long_query, docs, options)
    short = scorer.build("N/A", docs, options)
    assert result.prompt.doc_budget < short.doc_budget  # the long query took its share
    assert len(result.scores) == 3 and all(np.isfinite(result.scores))


# --- calibration ------------------------------------------------------------------------------


def test_masked_calibration_drops_outliers_below_mean_minus_two_std() -> None:
    na = torch.zeros(10)
    query = torch.tensor([1.0] * 9 + [-20.0])
    # c = query; mean = -1.1, sample std = sqrt(396.9 / 9) = 6.641: threshold = -14.38.
    assert masked_na_scores(query, na) == pytest.approx(9.0)
    # Nothing is below the threshold: every calibrated token counts.
    q = torch.tensor([0.5, 0.2, 0.4])
    n = torch.tensor([0.1, 0.1, 0.1])
    assert masked_na_scores(q, n) == pytest.approx(0.8)
    # The N/A pass is subtracted token by token before masking.
    assert masked_na_scores(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(
        1.0
    )
    assert masked_na_scores(torch.tensor([2.0]), torch.tensor([0.5])) == pytest.approx(1.5)
    assert masked_na_scores(torch.tensor([]), torch.tensor([])) == 0.0


# --- RankGPT ----------------------------------------------------------------------------------


def test_permutation_parsing_is_robust() -> None:
    assert parse_permutation("[3] > [1] > [3] > [9] > 2", 4) == ([2, 0, 1, 3], 3)
    assert parse_permutation("I think passage 2 is best", 3) == ([1, 0, 2], 1)
    assert parse_permutation("", 3) == ([0, 1, 2], 0)
    assert parse_permutation("[0] > [4]", 3) == ([0, 1, 2], 0)


def test_sliding_windows_go_from_the_back_to_the_front() -> None:
    assert sliding_windows(20, 20, 10) == [(0, 20)]
    assert sliding_windows(30, 20, 10) == [(10, 30), (0, 20)]
    assert sliding_windows(35, 20, 10) == [(15, 35), (5, 25), (0, 15)]


@dataclass
class FakeGeneration:
    text: str
    prompt_tokens: int = 100
    new_tokens: int = 12


class ScriptedLM:
    model_id = "scripted"
    model = None

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        self.tokenizer = tokenizer
        self.replies = replies
        self.prompts: list[list[dict[str, str]]] = []

    def generate(self, messages: Any, *, max_new_tokens: int = 64, temperature: float = 0.0) -> Any:
        self.prompts.append(list(messages))
        return FakeGeneration(self.replies.pop(0))


def test_rankgpt_applies_the_permutation_and_falls_back_to_input_order(tokenizer: Any) -> None:
    lm = ScriptedLM(tokenizer, ["[3] > [1]"])
    outcome = RankGPTRanker(lm).rerank("q", ["a", "b", "c", "d"], RankGPTOptions())
    assert outcome.ranking() == [2, 0, 1, 3]
    assert outcome.forward_passes == 12 and outcome.prompt_tokens == 100
    assert lm.prompts[0] == rankgpt_messages("q", ["a", "b", "c", "d"])


def test_engine_without_a_cross_encoder_is_unavailable_and_rejects_unknown_methods(
    tokenizer: Any,
) -> None:
    engine = RerankerEngine(lambda: ScriptedLM(tokenizer, []), lambda: None)  # type: ignore[arg-type,return-value]
    docs = [RerankDocument("a", "", "x")]
    with pytest.raises(LodestarError, match="no cross-encoder configured") as info:
        engine.rerank("q", docs, "cross-encoder")
    assert info.value.status == 503
    with pytest.raises(LodestarError, match="unknown method"):
        engine.rerank("q", docs, "bm42")


class UnitEmbedder:
    def encode(self, texts: Any, *, progress: bool = False) -> np.ndarray:
        vectors = np.array([[len(t) % 5 + 1.0, 1.0] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_cosine_orders_by_inner_product(tokenizer: Any) -> None:
    engine = RerankerEngine(lambda: ScriptedLM(tokenizer, []), UnitEmbedder)  # type: ignore[arg-type,return-value]
    docs = [RerankDocument(str(i), "", "y" * i) for i in range(1, 5)]
    outcome = engine.rerank("abcd", docs, "cosine")  # query vector (5, 1)
    vectors = UnitEmbedder().encode(["abcd", *[d.text for d in docs]])
    assert outcome.scores == pytest.approx((vectors[1:] @ vectors[0]).tolist())


# --- orchestrator wiring ----------------------------------------------------------------------


def _hit(doc_id: str, score: float) -> Hit:
    return Hit(doc_id=doc_id, title=doc_id, text=f"text {doc_id}", score=score)


class FakeIndex:
    def __init__(self, n: int) -> None:
        self.n = n
        self.requests: list[IndexSearchRequest] = []

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        self.requests.append(request)
        hits = [_hit(f"d{i}", float(self.n - i)) for i in range(min(self.n, request.k))]
        return IndexSearchResponse(
            collection=request.collection, version="v1", results={"bm25": hits}, timings_ms={}
        )


class DownReranker:
    async def rerank(self, request: RerankRequest) -> RerankResponse:
        raise DependencyError("reranker", "unreachable (ConnectError)")


async def test_search_reranks_the_pool_before_truncating_to_k() -> None:
    index, reranker = FakeIndex(30), ReversingReranker()
    pipeline = SearchPipeline(index, reranker=reranker, rerank_depth=5)
    trace = Trace(kind="search", request={})
    outcome = await pipeline.run(
        trace, query="q", collection="c", k=3, retrievers=["bm25"], rerank="icr"
    )
    assert index.requests[0].k == 5  # the pool, not k
    assert [d.doc_id for d in reranker.requests[0].documents] == ["d0", "d1", "d2", "d3", "d4"]
    assert [h.doc_id for h in outcome.hits] == ["d4", "d3", "d2"]
    assert outcome.hits[0].sources["rerank"].rank == 1 and outcome.degraded == []
    stage = next(s for s in trace.stages if s.stage == "rerank")
    assert [t["id"] for t in stage.targets] == ["d4", "d3", "d2", "d1", "d0"]
    assert stage.outputs["forward_passes"] == 2


async def test_search_falls_back_to_first_stage_order_when_the_reranker_is_down() -> None:
    pipeline = SearchPipeline(FakeIndex(30), reranker=DownReranker(), rerank_depth=5)
    trace = Trace(kind="search", request={})
    outcome = await pipeline.run(
        trace, query="q", collection="c", k=3, retrievers=["bm25"], rerank="rankgpt"
    )
    assert [h.doc_id for h in outcome.hits] == ["d0", "d1", "d2"]
    assert outcome.degraded == ["reranker"]
    stage = next(s for s in trace.stages if s.stage == "rerank")
    assert stage.outputs["fallback"] == "first_stage_order"


async def test_search_rejects_unknown_rerankers_and_leaves_order_alone_without_one() -> None:
    pipeline = SearchPipeline(FakeIndex(10), reranker=ReversingReranker())
    with pytest.raises(LodestarError, match="unknown reranker"):
        await pipeline.run(
            Trace(kind="search", request={}),
            query="q",
            collection="c",
            k=3,
            retrievers=["bm25"],
            rerank="monot5",
        )
    outcome = await pipeline.run(
        Trace(kind="search", request={}), query="q", collection="c", k=3, retrievers=["bm25"]
    )
    assert [h.doc_id for h in outcome.hits] == ["d0", "d1", "d2"]
