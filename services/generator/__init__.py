"""The generator service: an OpenAI-compatible chat-completions server with batched generation
on the CPU (``vllm serve`` replaces it on a GPU by URL; see docs/generator.md)."""
