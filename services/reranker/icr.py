"""ICR: in-context re-ranking from the attention of a causal LM (Chen, Gutiérrez and Su, 2025).

One prompt holds every candidate document, then the instruction and the query, in the model's chat
template (documents first, the strongest first-stage documents nearest the query by default).
The score of a document is how much attention the query tokens pay to its tokens, calibrated by
the attention the same tokens receive from a content-free query ("N/A"):

1. build the prompt from pieces and record the token span of every document and of the query,
   checked against the tokenizer (each span decodes back to its text; the prompt tokenized in one
   go equals the chat template's own tokenization);
2. forward pass 1: the N/A prompt; forward pass 2: the real query, reusing pass 1's KV cache
   cropped to the shared prefix (everything before the instruction), so the documents are
   encoded once;
3. for every layer and head, softmax(QKᵀ/√d) of the query-span rows over all prompt columns,
   recomputed in fp32 from the cached keys and the query states (see :class:`_AttentionProbe`),
   averaged over query rows, summed over heads and layers: a score a(t) per prompt token;
4. masked N/A calibration per document: c(t) = a_q(t) − a_NA(t), keep tokens with
   c(t) > mean(c) − 2·std(c) (within the document), score = Σ kept c(t).

Why recompute attention instead of ``output_attentions=True``: eager attention materialises the
full (layers × heads × T × T) tensor, about 30 × 9 × 3000² × 4 B ≈ 10 GB for a 20-document prompt
of SmolLM2. A forward hook on each attention module instead rebuilds the post-RoPE query states of
the query-span rows only (tens of rows) and multiplies them with that layer's cached keys, so peak
extra memory is heads × rows × T floats for one layer, the model itself keeps running its fast
SDPA kernel, and the softmax is always fp32 (the NaN the reference implementation's eager fp16 path produced
cannot happen). ``tests/unit/test_icr.py`` holds this path to ``output_attentions=True`` on a tiny
model.

Ablations (options): no calibration (``calibration="none"``), last layer only
(``layers="last"``), last query token only (``query_tokens="last"``), the raw query tokens as the
query span (``query_span="query"``) and two independent passes (``reuse_cache=False``).
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

#: The reference code's first user words and late instruction for retrieval type IE (the
#: default of its experiments) and QA.
PROMPT_INTRO = "Here are some paragraphs:"
INSTRUCTIONS = {
    "ie": "Please find information that are relevant to the following query in the paragraphs above.",
    "qa": "Please answer the following question based on the information in the paragraphs above.",
}
SEPARATOR = "\n\n"
NA_QUERY = "N/A"
#: Smallest per-document budget the prompt budget may shrink documents to.
MIN_DOC_TOKENS = 8


class ICRInputError(ValueError):
    """The documents cannot fit the prompt budget even at the minimum per-document budget."""


@dataclass(frozen=True)
class ICROptions:
    calibration: Literal["masked_na", "none"] = "masked_na"
    """``masked_na``: the paper's default; ``none``: raw query attention (one pass)."""
    layers: Literal["all", "last"] = "all"
    query_tokens: Literal["span", "last"] = "span"
    """Average over every query-span row, or use only the last prompt token."""
    query_span: Literal["instruction", "query"] = "instruction"
    """``instruction``: from the late instruction to the last prompt token (the reference code);
    ``query``: only the raw query's tokens."""
    doc_order: Literal["reverse", "input"] = "reverse"
    """``reverse``: the first input document (best first-stage) goes last, nearest the query."""
    retrieval_type: Literal["ie", "qa"] = "ie"
    reuse_cache: bool = True
    """Reuse the N/A pass's KV cache for the real query (documents encoded once)."""
    max_doc_tokens: int = 160
    """Tokens kept per document (the head of it)."""
    max_prompt_tokens: int = 4096
    """Whole-prompt budget; when exceeded every document is cut to an equal share."""


@dataclass
class ICRPrompt:
    """One ICR prompt and where everything is in it (token indices, end exclusive)."""

    input_ids: list[int]
    doc_spans: list[tuple[int, int]]
    """Span of each document, indexed like the *input* documents (not prompt order)."""
    doc_texts: list[str]
    """The (possibly truncated) text of each input document as placed in the prompt."""
    query_span: tuple[int, int]
    prefix_len: int
    """Tokens before the instruction: identical for the N/A and the real query prompt."""
    prompt_order: list[int]
    """Input index of the document at each prompt position."""
    truncated: int = 0
    doc_budget: int = 0


@dataclass
class ICRResult:
    scores: list[float]
    """One score per input document; higher is more relevant."""
    prompt: ICRPrompt
    forward_passes: int
    computed_tokens: int
    """Tokens run through the model over all passes (the shared prefix counted once)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    token_scores: list[Any] | None = None


# --- prompt construction ---------------------------------------------------------------------


def _document_text(title: str, text: str) -> str:
    title, text = " ".join(title.split()), text.strip()
    if title and text:
        return f"{title}: {text}"
    return title or text


def truncate_tokens(tokenizer: Any, text: str, budget: int) -> tuple[str, bool]:
    """The head of ``text`` that is at most ``budget`` tokens, cut on a token boundary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text, False
    return tokenizer.decode(ids[:budget]).strip(), True


def _render(tokenizer: Any, content: str) -> str:
    rendered: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return rendered


def _span_of(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token indices covering characters [start, end) (tokens that overlap the range)."""
    first = next(i for i, (s, e) in enumerate(offsets) if e > start and e > s)
    last = max(i for i, (s, e) in enumerate(offsets) if s < end and e > s)
    return first, last + 1


#: Unicode categories a prompt drops: control, surrogate, private-use and unassigned characters
#: mean nothing to the LM, and the tokenizer drops or splits them so that a document's token
#: span no longer decodes to its text (found by the contract test's fuzzing).
_UNPRINTABLE = frozenset({"Cc", "Cs", "Co", "Cn"})


def printable(text: str) -> str:
    """``text`` without the characters of ``_UNPRINTABLE`` (newlines and tabs kept)."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in _UNPRINTABLE)


def build_prompt(
    tokenizer: Any,
    query: str,
    documents: Sequence[str],
    options: ICROptions,
    *,
    doc_budget: int | None = None,
) -> ICRPrompt:
    """The ICR prompt for ``documents`` (input order = first-stage order) with verified spans.

    ``doc_budget`` fixes the per-document token budget instead of deriving it from the query's
    length: the N/A prompt takes the query prompt's, so both truncate the documents alike and
    share their document prefix however long the query is."""
    n = len(documents)
    if n == 0:
        raise ICRInputError("no documents to rerank")
    query = printable(query)
    documents = [printable(d) for d in documents]
    instruction = INSTRUCTIONS[options.retrieval_type]
    if doc_budget is None:
        # The configured budget, shrunk to an equal share of the prompt budget.
        overhead = len(_tokenize(tokenizer, _render(tokenizer, _content("", instruction, query))))
        overhead += 6 * n  # "[i] " markers and separators
        share = (options.max_prompt_tokens - overhead) // n
        doc_budget = min(options.max_doc_tokens, share)
    budget = doc_budget
    if budget < MIN_DOC_TOKENS:
        raise ICRInputError(
            f"{n} documents do not fit a {options.max_prompt_tokens}-token prompt "
            f"(at least {MIN_DOC_TOKENS} tokens each)"
        )
    texts, truncated = [], 0
    for doc in documents:
        text, cut = truncate_tokens(tokenizer, doc.strip(), budget)
        texts.append(text)
        truncated += cut
    order = list(range(n))[::-1] if options.doc_order == "reverse" else list(range(n))

    # The user message, built piece by piece with the character span of every part.
    content = PROMPT_INTRO
    char_spans: dict[int, tuple[int, int]] = {}
    for position, index in enumerate(order, start=1):
        content += f"{SEPARATOR}[{position}] "
        start = len(content)
        content += texts[index]
        char_spans[index] = (start, len(content))
    content += SEPARATOR
    instruction_at = len(content)
    content += f"{instruction}{SEPARATOR}Query: "
    query_at = len(content)
    content += query
    query_end = len(content)

    rendered = _render(tokenizer, content)
    base = rendered.find(content)
    if base < 0:
        raise RuntimeError("the chat template altered the user message; spans cannot be located")
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    reference = _tokenize(tokenizer, rendered, template=content)
    if ids != reference:
        raise RuntimeError(
            f"prompt-length mismatch: {len(ids)} tokens by offsets vs {len(reference)} by the "
            "chat template"
        )
    doc_spans: list[tuple[int, int]] = [(0, 0)] * n
    for index, (start, end) in char_spans.items():
        if start == end:  # an empty document: an empty span just before the separator
            at = _span_of(offsets, base + start, base + start + 1)[0]
            doc_spans[index] = (at, at)
            continue
        span = _span_of(offsets, base + start, base + end)
        decoded = tokenizer.decode(ids[span[0] : span[1]])
        if decoded.strip() != texts[index].strip():
            raise RuntimeError(
                f"document {index} span decodes to {decoded[:60]!r}, not {texts[index][:60]!r}"
            )
        doc_spans[index] = span
    instruction_token, _ = _span_of(offsets, base + instruction_at, base + instruction_at + 1)
    if options.query_span == "instruction":
        query_span = (instruction_token, len(ids))
    else:
        query_span = _span_of(offsets, base + query_at, base + query_end)
        decoded = tokenizer.decode(ids[query_span[0] : query_span[1]])
        if decoded.strip() != query.strip():
            raise RuntimeError(f"query span decodes to {decoded!r}, not {query!r}")
    if max(end for _, end in doc_spans) > instruction_token:
        raise RuntimeError("a document span overlaps the instruction")
    return ICRPrompt(
        input_ids=ids,
        doc_spans=doc_spans,
        doc_texts=texts,
        query_span=query_span,
        prefix_len=instruction_token,
        prompt_order=order,
        truncated=truncated,
        doc_budget=budget,
    )


def _content(body: str, instruction: str, query: str) -> str:
    return f"{PROMPT_INTRO}{body}{SEPARATOR}{instruction}{SEPARATOR}Query: {query}"


def _tokenize(tokenizer: Any, rendered: str, template: str | None = None) -> list[int]:
    if template is not None:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": template}], tokenize=True, add_generation_prompt=True
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


# --- attention -------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(keys: torch.Tensor, groups: int) -> torch.Tensor:
    return keys if groups == 1 else keys.repeat_interleave(groups, dim=1)


class _AttentionProbe:
    """Forward hooks that add, per selected layer, the query-span rows' attention over every
    prompt column (mean over rows, sum over heads) into ``total``.

    The hook runs after the attention module, when that layer's cache holds the keys of every
    position so far (post-RoPE). Query states are rebuilt from the module's input hidden states
    with its own ``q_proj`` and the rotary embedding it was given.
    """

    def __init__(
        self, model: Any, layers: Sequence[int], rows: tuple[int, int], last_row_only: bool
    ) -> None:
        self.layers = set(layers)
        self.rows = rows
        self.last_row_only = last_row_only
        self.total: torch.Tensor | None = None
        # Hooks live on a model other threads may run (e.g. generation): only count our forward.
        self._thread = threading.get_ident()
        self._handles = [
            layer.self_attn.register_forward_hook(self._hook, with_kwargs=True)
            for index, layer in enumerate(_decoder_layers(model))
            if index in self.layers
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(
        self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if threading.get_ident() != self._thread:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            raise RuntimeError("ICR needs use_cache=True: keys are read from the KV cache")
        keys = cache.layers[module.layer_idx].keys  # (1, kv_heads, T, d)
        total_len = keys.shape[2]
        fed = hidden.shape[1]
        offset = total_len - fed  # absolute position of this call's first token
        start, end = self.rows
        if start < offset:
            raise RuntimeError("the query span starts inside the reused cache")
        local = slice(start - offset, end - offset)
        h = hidden[:, local]
        head_dim = module.head_dim
        q = module.q_proj(h).view(1, h.shape[1], -1, head_dim).transpose(1, 2).float()
        c, s = cos[:, local].float().unsqueeze(1), sin[:, local].float().unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = _repeat_kv(keys.float(), module.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scaling  # (1, H, rows, T)
        positions = torch.arange(start, end, device=scores.device).unsqueeze(1)
        columns = torch.arange(total_len, device=scores.device).unsqueeze(0)
        scores = scores.masked_fill(columns > positions, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.last_row_only:
            probs = probs[:, :, -1:]
        contribution = probs.mean(dim=2).sum(dim=1)[0]  # (T,)
        self.total = contribution if self.total is None else self.total + contribution


def _decoder_layers(model: Any) -> Any:
    body = model.model if hasattr(model, "model") else model
    return body.layers


def _body(model: Any) -> Any:
    """The transformer without its LM head: ICR needs no logits (saves ~20% of the compute)."""
    return model.model if hasattr(model, "model") else model


def masked_na_scores(query_att: torch.Tensor, na_att: torch.Tensor) -> float:
    """Σ over kept tokens of (query − N/A), keeping tokens above mean − 2·std (sample std) of
    the calibrated scores within this document. A one-token document keeps its token."""
    calibrated = query_att.double() - na_att.double()
    if calibrated.numel() == 0:
        return 0.0
    if calibrated.numel() == 1:
        return float(calibrated.sum())
    threshold = calibrated.mean() - 2 * calibrated.std()
    return float(calibrated[calibrated > threshold].sum())


# --- the scorer --------------------------------------------------------------------------------


class ICRScorer:
    """ICR over one causal LM with a chat template (any Llama-like Hugging Face model)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.n_layers = len(_decoder_layers(model))
        self._lock = threading.Lock()

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def build(
        self,
        query: str,
        documents: Sequence[str],
        options: ICROptions,
        *,
        doc_budget: int | None = None,
    ) -> ICRPrompt:
        return build_prompt(self.tokenizer, query, documents, options, doc_budget=doc_budget)

    def _attend(
        self,
        ids: list[int],
        rows: tuple[int, int],
        options: ICROptions,
        cache: Any,
    ) -> torch.Tensor:
        """Run ``ids`` (continuing ``cache``) and return the per-column attention total."""
        layers = range(self.n_layers) if options.layers == "all" else [self.n_layers - 1]
        probe = _AttentionProbe(self.model, list(layers), rows, options.query_tokens == "last")
        try:
            tensor = torch.tensor([ids], device=self.device)
            _body(self.model)(input_ids=tensor, cache=cache, use_cache=True)
        finally:
            probe.remove()
        if probe.total is None:
            raise RuntimeError("no attention layer ran")
        return probe.total

    def attention(
        self,
        prompt: ICRPrompt,
        query_ids: list[int],
        options: ICROptions,
        *,
        na_ids: list[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """(query attention, N/A attention or None, forward passes, computed tokens)."""
        from transformers import DynamicCache

        with self._lock, torch.inference_mode():
            if na_ids is None:
                query_att = self._attend(query_ids, prompt.query_span, options, DynamicCache())
                return query_att, None, 1, len(query_ids)
            na_span = (prompt.query_span[0], prompt.query_span[1] + len(na_ids) - len(query_ids))
            if options.query_span == "query":
                na_span = _na_query_span(self.tokenizer, na_ids, prompt.prefix_len)
            cache = DynamicCache()
            na_att = self._attend(na_ids, na_span, options, cache)
            if options.reuse_cache:
                # Keep the shared prefix: transformers 5 crops by a negative count to remove.
                removed = cache.get_seq_length() - prompt.prefix_len
                if removed > 0:
                    cache.crop(-removed)
                query_att = self._attend(
                    query_ids[prompt.prefix_len :], prompt.query_span, options, cache
                )
                computed = len(na_ids) + len(query_ids) - prompt.prefix_len
            else:
                query_att = self._attend(query_ids, prompt.query_span, options, DynamicCache())
                computed = len(na_ids) + len(query_ids)
            return query_att, na_att, 2, computed

    def score(
        self,
        query: str,
        documents: Sequence[str],
        options: ICROptions | None = None,
        *,
        keep_token_scores: bool = False,
    ) -> ICRResult:
        options = options or ICROptions()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        prompt = self.build(query, documents, options)
        na_ids: list[int] | None = None
        if options.calibration == "masked_na":
            na_prompt = self.build(NA_QUERY, documents, options, doc_budget=prompt.doc_budget)
            if (
                na_prompt.input_ids[: prompt.prefix_len] != prompt.input_ids[: prompt.prefix_len]
                or na_prompt.prefix_len != prompt.prefix_len
                or na_prompt.doc_spans != prompt.doc_spans
            ):
                raise RuntimeError("the N/A and query prompts do not share their document prefix")
            na_ids = na_prompt.input_ids
        timings["prompt"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        query_att, na_att, passes, computed = self.attention(
            prompt, prompt.input_ids, options, na_ids=na_ids
        )
        timings["forward"] = (time.perf_counter() - started) * 1000
        scores: list[float] = []
        token_scores: list[Any] = []
        for start, end in prompt.doc_spans:
            q = query_att[start:end]
            if na_att is None:
                scores.append(float(q.double().sum()))
                token_scores.append(q.tolist())
            else:
                na = na_att[start:end]
                scores.append(masked_na_scores(q, na))
                token_scores.append((q - na).tolist())
        return ICRResult(
            scores=scores,
            prompt=prompt,
            forward_passes=passes,
            computed_tokens=computed,
            timings_ms=timings,
            token_scores=token_scores if keep_token_scores else None,
        )

    def forward_once(self, ids: list[int]) -> float:
        """Seconds for one plain forward pass over ``ids`` (the cost ICR is compared with)."""
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            _body(self.model)(input_ids=torch.tensor([ids], device=self.device), use_cache=False)
            return time.perf_counter() - started


def _na_query_span(tokenizer: Any, ids: list[int], prefix_len: int) -> tuple[int, int]:
    """The raw-query span ("N/A") of the N/A prompt, found by decoding after the prefix."""
    for start in range(prefix_len, len(ids)):
        for end in range(start + 1, min(start + 8, len(ids)) + 1):
            if tokenizer.decode(ids[start:end]).strip() == NA_QUERY:
                before = tokenizer.decode(ids[prefix_len:start])
                if before.rstrip().endswith("Query:"):
                    return start, end
    raise RuntimeError("cannot locate the N/A query tokens")


def document_text(title: str, text: str) -> str:
    """How a document appears in ranking prompts: ``title: text`` (either may be empty)."""
    return _document_text(title, text)
