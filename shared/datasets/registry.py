"""The registry of corpora by name: :data:`DATASETS` and :func:`load_collection_documents`."""

from __future__ import annotations

from collections.abc import Callable

from shared.datasets.beir import load_scifact
from shared.datasets.hotpotqa import load_hotpotqa
from shared.datasets.nq import load_nq_open_oracle
from shared.datasets.wiki import load_wikipedia_summaries
from shared.schemas import Document

DATASETS: dict[str, Callable[[], list[Document]]] = {
    "wiki": load_wikipedia_summaries,
    "scifact": lambda: load_scifact().corpus,
    "hotpotqa-dev": lambda: load_hotpotqa("dev")[1],
    "hotpotqa-train": lambda: load_hotpotqa("train")[1],
    "nq-oracle": lambda: load_nq_open_oracle()[1],
}
"""Corpus loaders by name; each name is also a valid collection name."""


def load_collection_documents(name: str) -> list[Document]:
    """The corpus documents of a named dataset (see :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        ) from None
    return loader()
