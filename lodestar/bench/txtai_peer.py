"""The txtai side of ``lodestar bench search``: runs with txtai's own venv, never Lodestar's.

txtai (a peer with Lodestar's shape: a FastAPI service with hybrid BM25 + dense search) is
installed only into the bench's environment (``var/bench-txtai-venv``), so this file imports
nothing from Lodestar and nothing Lodestar's dependencies provide that txtai does not.

    python txtai_peer.py build --passages PASSAGES.jsonl --model MODEL_DIR --out INDEX_DIR
    python txtai_peer.py serve --index INDEX_DIR --port 18100

``build`` indexes the very passages of a Lodestar collection (its ``passages.jsonl``: the text
each passage is embedded from is "title text", as Lodestar embeds it) with txtai's defaults for a
hybrid index: the same MiniLM directory as ``path``, ``content`` stored, ``hybrid`` (txtai's BM25
beside the dense index). ``serve`` runs txtai's own API app (``txtai.api:app``) under uvicorn on
that index, read-only: ``GET /search?query=...&limit=k``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def build(passages: Path, model: str, out: Path, batch: int) -> None:
    from txtai import Embeddings

    rows = []
    with passages.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            text = f"{record['title']} {record['text']}".strip()
            rows.append((record["passage_id"], {"text": text, "doc_id": record["doc_id"]}, None))
    started = time.perf_counter()
    embeddings = Embeddings(path=model, content=True, hybrid=True, batch=batch, encodebatch=batch)
    embeddings.index(rows)
    embeddings.save(str(out))
    seconds = time.perf_counter() - started
    (out / "bench-build.json").write_text(
        json.dumps({"passages": len(rows), "seconds": round(seconds, 1), "model": model}) + "\n"
    )
    print(f"txtai indexed {len(rows)} passages in {seconds:.1f} s -> {out}", flush=True)


def serve(index: Path, port: int) -> None:
    import uvicorn

    config = index.parent / f"{index.name}-api.yml"
    # txtai.api reads its configuration from the file named by CONFIG at import time.
    # ``embeddings`` enables the search routes; ``path`` loads the saved index (whose own
    # configuration names the model).
    model = json.loads((index / "config.json").read_text())["path"]
    config.write_text(f"path: {index}\nwritable: false\nembeddings:\n  path: {model}\n")
    os.environ["CONFIG"] = str(config)
    uvicorn.run("txtai.api:app", host="127.0.0.1", port=port, log_level="warning")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--passages", type=Path, required=True)
    b.add_argument("--model", required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--batch", type=int, default=64)
    s = sub.add_parser("serve")
    s.add_argument("--index", type=Path, required=True)
    s.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.passages, args.model, args.out, args.batch)
    else:
        serve(args.index, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
