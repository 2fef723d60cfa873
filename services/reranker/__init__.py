"""The reranker service: ICR (in-context re-ranking from attention) and its baselines."""
