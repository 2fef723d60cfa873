"""The evaluation harness: one command measures every retriever, reranker and RAG method.

- :mod:`lodestar.evaluation.retrieval`: BEIR-style retrieval evaluation (nDCG@10, Recall@10/100,
  MRR@10, latency) of the systems in :data:`~lodestar.evaluation.retrieval.SYSTEMS`.
- :mod:`lodestar.evaluation.rag`: question answering (EM, F1, supporting-document recall, rounds,
  tokens, latency) of the methods in :data:`~lodestar.evaluation.rag.METHODS`.
- :mod:`lodestar.evaluation.expected`: the checked-in expected figures
  (``benchmarks/expected.yaml``, Pyserini's "2CR" idea) and the regression check.
- :mod:`lodestar.evaluation.report`: ``docs/results.md`` from the JSON results.
- :mod:`lodestar.evaluation.cli`: the ``lodestar eval`` command group.

Queries run through the same code the services run: in-process, the index engine behind
``InProcessIndex`` and the orchestrator's ``SearchPipeline`` / ``AnswerPipeline``; with
``--stack URL``, a running orchestrator over HTTP.
"""
