"""Document identifiers for a Differentiable Search Index, and the prefix trie that constrains
decoding to them.

Every docid is a tuple of small integers. The model spells it with dedicated vocabulary tokens
``<d0>``, ``<d1>``, ... (never the tokenizer's own word pieces, so a docid cannot collide with
text) followed by an end marker; atomic docids are a single token per document.

* ``atomic``: one position, the document's ordinal; decoded as a classification over docid tokens.
* ``naive``: the ordinal written in decimal digits, one token per digit (an arbitrary string).
* ``semantic``: the path of cluster indices of a hierarchical k-means over MiniLM embeddings
  (k clusters per level, recursing until a cluster holds at most c documents), then the
  document's position inside its leaf. Similar documents share prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

DocidKind = Literal["atomic", "naive", "semantic"]
DOCID_KINDS: tuple[DocidKind, ...] = ("atomic", "naive", "semantic")

Docid = tuple[int, ...]


def docid_text(docid: Docid) -> str:
    """The human-readable form served by the API, e.g. ``3-0-17``."""
    return "-".join(str(part) for part in docid)


def parse_docid(text: str) -> Docid:
    return tuple(int(part) for part in text.split("-"))


@dataclass
class _Node:
    """A cluster of the semantic hierarchy: either split into children or a leaf of documents."""

    centroid: np.ndarray
    children: list[_Node] = field(default_factory=list)
    size: int = 0  # documents placed in this leaf so far (next free position)

    def to_json(self) -> dict[str, Any]:
        return {
            "centroid": [round(float(x), 6) for x in self.centroid],
            "children": [child.to_json() for child in self.children],
            "size": self.size,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Node:
        return cls(
            centroid=np.asarray(data["centroid"], dtype=np.float32),
            children=[cls.from_json(child) for child in data["children"]],
            size=int(data["size"]),
        )


def _kmeans(vectors: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(vectors)
    return model.labels_.astype(np.int64), model.cluster_centers_.astype(np.float32)


class SemanticHierarchy:
    """Hierarchical k-means over document embeddings (DSI's semantically structured docids).

    New documents (a continual step) descend to the nearest centroid at every level and take the
    next free position of that leaf, so old docids never change (DSI++ keeps old ids fixed).
    """

    def __init__(self, root: _Node, k: int, leaf_size: int) -> None:
        self.root = root
        self.k = k
        self.leaf_size = leaf_size

    @classmethod
    def build(
        cls, vectors: np.ndarray, *, k: int = 10, leaf_size: int = 100, seed: int = 0
    ) -> tuple[SemanticHierarchy, list[Docid]]:
        docids: list[Docid | None] = [None] * len(vectors)
        root = _Node(centroid=vectors.mean(axis=0) if len(vectors) else np.zeros(1, np.float32))

        def split(node: _Node, rows: np.ndarray, prefix: Docid, depth: int) -> None:
            if len(rows) <= leaf_size:
                for position, row in enumerate(rows.tolist()):
                    docids[row] = (*prefix, position)
                node.size = len(rows)
                return
            labels, centroids = _kmeans(vectors[rows], k, seed + depth)
            if len(np.unique(labels)) < 2:  # identical vectors: split by order instead
                labels = np.arange(len(rows)) % k
            for cluster in range(k):
                members = rows[labels == cluster]
                child = _Node(centroid=centroids[cluster])
                node.children.append(child)
                split(child, members, (*prefix, cluster), depth + 1)

        split(root, np.arange(len(vectors)), (), 0)
        assert all(d is not None for d in docids)
        return cls(root, k, leaf_size), [d for d in docids if d is not None]

    def assign(self, vector: np.ndarray) -> Docid:
        """A docid for a new document: nearest centroid per level, next free leaf position."""
        node = self.root
        prefix: list[int] = []
        while node.children:
            scores = [float(np.dot(vector, child.centroid)) for child in node.children]
            best = int(np.argmax(scores))
            prefix.append(best)
            node = node.children[best]
        position = node.size
        node.size += 1
        return (*prefix, position)

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "leaf_size": self.leaf_size, "root": self.root.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SemanticHierarchy:
        return cls(_Node.from_json(data["root"]), int(data["k"]), int(data["leaf_size"]))


class DocidScheme:
    """Maps document ids to docids and back; grows with every continual step."""

    def __init__(self, kind: DocidKind, hierarchy: SemanticHierarchy | None = None) -> None:
        if kind == "semantic" and hierarchy is None:
            raise ValueError("semantic docids need a hierarchy")
        self.kind = kind
        self.hierarchy = hierarchy
        self.docid_of: dict[str, Docid] = {}
        self.doc_of: dict[Docid, str] = {}

    @classmethod
    def create(
        cls,
        kind: DocidKind,
        doc_ids: Sequence[str],
        embeddings: np.ndarray | None = None,
        *,
        k: int = 10,
        leaf_size: int = 100,
        seed: int = 0,
    ) -> DocidScheme:
        if kind == "semantic":
            if embeddings is None:
                raise ValueError("semantic docids need document embeddings")
            hierarchy, docids = SemanticHierarchy.build(
                embeddings, k=k, leaf_size=leaf_size, seed=seed
            )
            scheme = cls(kind, hierarchy)
            for doc_id, docid in zip(doc_ids, docids, strict=True):
                scheme._bind(doc_id, docid)
            return scheme
        scheme = cls(kind)
        scheme.extend(doc_ids, embeddings)
        return scheme

    def _bind(self, doc_id: str, docid: Docid) -> None:
        if doc_id in self.docid_of:
            raise ValueError(f"document {doc_id!r} already has a docid")
        if docid in self.doc_of:
            raise ValueError(f"docid {docid} is already taken")
        self.docid_of[doc_id] = docid
        self.doc_of[docid] = doc_id

    def extend(self, doc_ids: Sequence[str], embeddings: np.ndarray | None = None) -> list[Docid]:
        """Give new documents docids without changing any existing one."""
        new: list[Docid] = []
        for row, doc_id in enumerate(doc_ids):
            ordinal = len(self.docid_of)
            if self.kind == "atomic":
                docid: Docid = (ordinal,)
            elif self.kind == "naive":
                docid = tuple(int(ch) for ch in str(ordinal))
            else:
                assert self.hierarchy is not None
                if embeddings is None:
                    raise ValueError("semantic docids need document embeddings")
                docid = self.hierarchy.assign(embeddings[row])
            self._bind(doc_id, docid)
            new.append(docid)
        return new

    @property
    def max_token_value(self) -> int:
        return max((max(d) for d in self.doc_of), default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hierarchy": None if self.hierarchy is None else self.hierarchy.to_json(),
            "docids": {doc_id: list(docid) for doc_id, docid in self.docid_of.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DocidScheme:
        hierarchy = None
        if data["hierarchy"] is not None:
            hierarchy = SemanticHierarchy.from_json(data["hierarchy"])
        scheme = cls(data["kind"], hierarchy)
        for doc_id, docid in data["docids"].items():
            scheme._bind(doc_id, tuple(int(x) for x in docid))
        return scheme


class Trie:
    """Prefix trie over token-id sequences; ``children(prefix)`` gives the allowed next tokens.

    Sequences end with the end marker, so a complete docid is a path to a node whose only child is
    the end token, and decoding can never stop inside a docid or leave the set of valid docids.
    """

    def __init__(self) -> None:
        self._root: dict[int, Any] = {}
        self.size = 0

    def add(self, tokens: Sequence[int]) -> None:
        node = self._root
        for token in tokens:
            node = node.setdefault(int(token), {})
        self.size += 1

    def children(self, prefix: Sequence[int]) -> list[int]:
        node: dict[int, Any] | None = self._root
        for token in prefix:
            assert node is not None
            node = node.get(int(token))
            if node is None:
                return []
        assert node is not None
        return list(node.keys())

    def contains(self, tokens: Sequence[int]) -> bool:
        node: dict[int, Any] | None = self._root
        for token in tokens:
            assert node is not None
            node = node.get(int(token))
            if node is None:
                return False
        return node is not None and not node
