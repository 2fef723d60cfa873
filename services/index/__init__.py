"""The index service: dense (exact; ANN + exact re-scoring later) and BM25 retrieval."""
