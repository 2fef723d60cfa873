"""The SIM-RAG critic: judges whether a multi-round answer is supported well enough to stop."""
