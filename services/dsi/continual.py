"""Building blocks of DSI++ continual indexing shared by the service and the experiment:
training examples, the query generator (generative memory) and the per-method data mix."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.dsi.docids import DocidScheme
from services.dsi.model import T5Dsi, T5Shape, lr_for_step
from services.dsi.training import Example
from shared.schemas import Document

if TYPE_CHECKING:
    from shared.llm import RemoteGenerator
    from shared.models import Generator


@dataclass(frozen=True)
class ContinualMethod:
    """How a new corpus is indexed: ``sam`` flattens the minimum, ``memory`` mixes in
    pseudo-queries of old documents (replay) and of new ones; ``retrain`` starts from scratch on
    everything seen so far (the reference DSI++ compares against)."""

    name: str
    sam: bool = False
    memory: bool = False
    retrain: bool = False


METHODS: dict[str, ContinualMethod] = {
    "naive": ContinualMethod("naive"),
    "sam": ContinualMethod("sam", sam=True),
    "genmem": ContinualMethod("genmem", memory=True),
    "genmem+sam": ContinualMethod("genmem+sam", sam=True, memory=True),
    "retrain": ContinualMethod("retrain", retrain=True),
}


def doc_text(doc: Document) -> str:
    return f"{doc.title}. {doc.text}" if doc.title else doc.text


def index_examples(docs: Sequence[Document], scheme: DocidScheme) -> list[Example]:
    """DSI's indexing task: the document's first L tokens (cut at training time) -> its docid."""
    return [Example(doc_text(doc), scheme.docid_of[doc.id], "index") for doc in docs]


def query_examples(
    queries: Mapping[str, Sequence[str]], scheme: DocidScheme, task: str
) -> list[Example]:
    """Retrieval task examples: each (doc id -> queries) pair becomes query -> docid."""
    return [
        Example(query, scheme.docid_of[doc_id], task)
        for doc_id, texts in queries.items()
        for query in texts
    ]


def step_examples(
    method: ContinualMethod,
    new_docs: Sequence[Document],
    old_doc_ids: Sequence[str],
    scheme: DocidScheme,
    pseudo_queries: Mapping[str, Sequence[str]],
    *,
    replay_per_new_doc: int,
    rng: random.Random,
) -> list[Example]:
    """The training mix for one continual step (not for ``retrain``).

    Without memory: indexing examples of the new documents only (new documents have no real
    queries). With generative memory: plus pseudo-queries of the new documents, plus
    ``replay_per_new_doc * len(new_docs)`` pseudo-queries sampled from old documents (no real
    old query is stored or replayed).
    """
    examples = index_examples(new_docs, scheme)
    if not method.memory:
        return examples
    examples += query_examples(
        {d.id: pseudo_queries.get(d.id, []) for d in new_docs}, scheme, "pseudo"
    )
    old_pool = [(doc_id, q) for doc_id in old_doc_ids for q in pseudo_queries.get(doc_id, [])]
    count = min(len(old_pool), replay_per_new_doc * len(new_docs))
    for doc_id, query in rng.sample(old_pool, count):
        examples.append(Example(query, scheme.docid_of[doc_id], "pseudo"))
    return examples


def train_query_generator(
    pairs: Sequence[tuple[str, str]],
    *,
    shape: T5Shape,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    doc_tokens: int = 64,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    device: str = "cpu",
) -> tuple[T5Dsi, int]:
    """docT5query-style doc -> query generator trained on (document, real query) pairs of D0.
    Returns the model and the number of optimiser updates it took."""
    generator = T5Dsi(shape, seed=seed + 1, docid_head=False)
    generator.model.to(device)
    optimiser = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    updates = 0
    generator.train(True)
    for epoch in range(epochs):
        rng.shuffle(order)
        total, batches = 0.0, 0
        for start in range(0, len(order), batch_size):
            chunk = [pairs[i] for i in order[start : start + batch_size]]
            for group in optimiser.param_groups:
                group["lr"] = lr_for_step(updates, lr, 20)
            optimiser.zero_grad(set_to_none=True)
            loss = generator.seq2seq_loss([d for d, _ in chunk], [q for _, q in chunk], doc_tokens)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            updates += 1
            total += float(loss.detach())
            batches += 1
        if progress is not None:
            progress(epoch + 1, epochs, total / max(1, batches))
    generator.train(False)
    return generator, updates


def generate_pseudo_queries(
    generator: T5Dsi,
    docs: Sequence[Document],
    per_doc: int,
    *,
    doc_tokens: int = 64,
    max_new_tokens: int = 20,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, list[str]]:
    """``per_doc`` sampled pseudo-queries per document (empty generations are dropped)."""
    out: dict[str, list[str]] = {}
    for start in range(0, len(docs), batch_size):
        chunk = list(docs[start : start + batch_size])
        samples = generator.generate_text(
            [doc_text(d) for d in chunk], doc_tokens, per_doc, max_new_tokens, seed + start
        )
        for doc, queries in zip(chunk, samples, strict=True):
            out[doc.id] = [q.strip() for q in queries if q.strip()]
    return out


QUERY_INSTRUCTION = (
    "Write one short search question that the passage answers. Reply with the question only."
)


def _ask_for_query(passage: str, words: int) -> dict[str, str]:
    return {
        "role": "user",
        "content": f"{QUERY_INSTRUCTION}\n\n{' '.join(passage.split()[:words])}",
    }


def generate_pseudo_queries_lm(
    generator: Generator | RemoteGenerator,
    docs: Sequence[Document],
    per_doc: int,
    demonstrations: Sequence[tuple[str, str]],
    *,
    passage_words: int = 60,
    max_new_tokens: int = 24,
    temperature: float = 0.8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[str]]:
    """Pseudo-queries from a pretrained chat LM: the pretrained
    doc -> query generator DSI++ takes from docT5query, here SmolLM2-135M-Instruct prompted with
    a few real (document, question) pairs of D0 as demonstrations instead of fine-tuned on them.
    The first query of a document is greedy, further ones are sampled; duplicates and empty
    generations are dropped."""
    shots: list[dict[str, str]] = []
    for passage, question in demonstrations:
        shots.append(_ask_for_query(passage, passage_words))
        shots.append({"role": "assistant", "content": question.strip().rstrip("?") + "?"})
    out: dict[str, list[str]] = {}
    for position, doc in enumerate(docs):
        messages = [*shots, _ask_for_query(doc_text(doc), passage_words)]
        queries: list[str] = []
        for sample in range(per_doc):
            text = generator.generate(
                messages,
                max_new_tokens=max_new_tokens,
                temperature=0.0 if sample == 0 else temperature,
            ).text.strip()
            query = text.splitlines()[0].strip() if text else ""
            if query and query not in queries:
                queries.append(query)
        out[doc.id] = queries
        if progress is not None:
            progress(position + 1, len(docs))
    return out


@dataclass
class PromptedQueryGenerator:
    """What a collection keeps of the ``lm`` query generator: its demonstrations (the LM itself
    is the shared SmolLM2, not a per-collection model)."""

    demonstrations: list[tuple[str, str]]

    FILENAME = "demonstrations.json"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.FILENAME).write_text(json.dumps(self.demonstrations))

    @classmethod
    def load(cls, directory: Path) -> PromptedQueryGenerator:
        pairs = json.loads((directory / cls.FILENAME).read_text())
        return cls([(passage, question) for passage, question in pairs])
