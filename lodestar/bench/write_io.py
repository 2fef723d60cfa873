"""``lodestar bench write-io``: one-document upserts in process, by count and as a ratio to one
query encode.

    lodestar bench write-io --compare BEFORE_TREE AFTER_TREE --sizes 10000,100000

runs ``--measure`` (this file run as a script) once per tree and size (without ``--compare``:
this checkout alone), alternating the trees, each in its own process that
imports the index engine from that tree (``git archive <commit> | tar -x -C BEFORE_TREE``): a
collection of ``--passages`` synthetic one-passage documents (hashed vectors, so building it
costs no encoding; the default ANN configuration: flat below 20k passages, IVF-PQ + exact
above), merged, then ``--pre-segments`` one-document upserts and a delete, then ``--repeats``
measured one-document upserts of a new document (its passage encoded by the real model, fp32,
as the index service does), each followed by a BM25 and a dense search that return it. Per
upsert: fsyncs of files and of directories, directories created, hard links, files created and
their bytes, bytes hashed, the upsert's ms and to-searchable ms; the unit is the bare fp32
encode p50 of one query on one thread (sentence-transformers, 40 queries), measured before and
after in the same process. The last upsert is profiled (cProfile): seal, prune and encode.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def measure(root: Path, n_docs: int, pre_segments: int, repeats: int) -> dict[str, Any]:
    sys.path.insert(0, str(root))
    import torch

    import shared.artifacts as artifacts
    from services.index.ann import AnnConfig
    from services.index.engine import IndexEngine
    from shared.models import Embedder
    from shared.schemas import Document

    torch.set_num_threads(1)
    real = Embedder("cpu", 64)

    class Embed:
        """Hashed unit vectors for the bulk build; the real model for a write's passage."""

        model_id, dim, batch_size = "bench", 384, 64

        def encode(self, texts: list[str]) -> np.ndarray:
            if len(texts) <= 4:
                return np.asarray(real.encode(texts), dtype=np.float32)
            rows = [
                np.random.default_rng(zlib.crc32(t.encode())).standard_normal(384) for t in texts
            ]
            out = np.asarray(rows, dtype=np.float32)
            unit: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
            return unit

        def encode_queries(self, texts: list[str]) -> np.ndarray:
            return np.asarray(real.encode(texts), dtype=np.float32)

    def encode_p50() -> float:
        queries = [f"who painted the mona lisa in year {i}" for i in range(40)]
        for q in queries[:5]:
            real.encode([q])
        times = []
        for q in queries:
            started = time.perf_counter()
            real.encode([q])
            times.append((time.perf_counter() - started) * 1000)
        return float(np.median(times))

    counts: dict[str, int] = {}
    lock = threading.Lock()
    real_fsync, real_mkdir, real_link, real_sha = os.fsync, os.mkdir, os.link, artifacts.sha256_of

    def bump(key: str, by: int = 1) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + by

    def fsync(fd: int) -> None:
        bump("fsync_dirs" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync_files")
        real_fsync(fd)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(path, *args, **kwargs)
        bump("dirs_created")

    def link(*args: Any, **kwargs: Any) -> None:
        bump("links")
        real_link(*args, **kwargs)

    def sha(path: Path) -> str:
        bump("bytes_hashed", path.stat().st_size)
        return str(real_sha(path))

    def inodes(directory: Path) -> dict[int, int]:
        out = {}
        for dirpath, _, files in os.walk(directory):
            for name in files:
                info = os.stat(os.path.join(dirpath, name))
                out[info.st_ino] = info.st_size
        return out

    encode_before = encode_p50()
    rng = np.random.default_rng(0)
    words = [f"w{zlib.crc32(str(i).encode()):08x}" for i in range(5000)]
    docs = [
        Document(id=f"d{i}", title=f"T{i}", text=" ".join(rng.choice(words, 60)))
        for i in range(n_docs)
    ]
    embed = Embed()
    rows: list[dict[str, Any]] = []
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="lodestar-write-io-") as tmp:
        engine = IndexEngine(
            Path(tmp),
            lambda: embed,  # type: ignore[arg-type, return-value]
            ann=AnnConfig(),
            max_candidates=1000,
            device="cpu",
        )
        started = time.perf_counter()
        for start in range(0, n_docs, 20000):
            engine.upsert("bench", docs[start : start + 20000])
        engine.merge("bench")
        build_s = time.perf_counter() - started
        for i in range(pre_segments):
            engine.upsert("bench", [Document(id=f"pre{i}", title="pre", text=f"preword{i} moon")])
        engine.delete("bench", "d1")
        engine.search("bench", "warm up", 3, ["bm25", "dense"])
        collection = engine.root / "bench"
        os.fsync, os.mkdir, os.link = fsync, mkdir, link  # type: ignore[assignment]
        artifacts.sha256_of = sha
        try:
            for i in range(repeats):
                word = f"benchquokka{i}"
                doc = Document(id=f"new-{word}", title=word, text=f"{word} is a purple moon.")
                before = inodes(collection)
                counts.clear()
                segments = len(engine.snapshot("bench").rows.segments)
                last = i == repeats - 1
                started = time.perf_counter()
                if last:
                    profile.enable()
                engine.upsert("bench", [doc])
                if last:
                    profile.disable()
                written = time.perf_counter()
                snap, found, _ = engine.search("bench", word, 3, ["bm25", "dense"])
                assert all(snap.documents[r[0].doc_index].id == doc.id for r in found.values())
                done = time.perf_counter()
                new = {k: v for k, v in inodes(collection).items() if k not in before}
                rows.append(
                    {
                        "segments_before": segments,
                        "upsert_ms": round((written - started) * 1000, 1),
                        "searchable_ms": round((done - started) * 1000, 1),
                        "files_created": len(new),
                        "bytes_created": sum(new.values()),
                        **{
                            k: counts.get(k, 0)
                            for k in (
                                "fsync_files",
                                "fsync_dirs",
                                "dirs_created",
                                "links",
                                "bytes_hashed",
                            )
                        },
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            counts.clear()
            started = time.perf_counter()
            engine.delete("bench", "d2")
            delete = {"delete_ms": round((time.perf_counter() - started) * 1000, 1), **counts}
        finally:
            os.fsync, os.mkdir, os.link = real_fsync, real_mkdir, real_link
            artifacts.sha256_of = real_sha
        backend = engine.snapshot("bench").dense.name
    encode_after = encode_p50()
    unit = (encode_before + encode_after) / 2
    stats = pstats.Stats(profile)
    by_name: dict[str, float] = {}
    for (filename, _, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        if (
            name in ("_seal", "prune", "_embed_passages", "upsert")
            and "site-packages" not in filename
        ):
            by_name[name] = round(by_name.get(name, 0.0) + entry[3] * 1000, 1)
    upsert_p50 = float(np.median([r["upsert_ms"] for r in rows]))
    searchable_p50 = float(np.median([r["searchable_ms"] for r in rows]))
    return {
        "tree": str(root),
        "passages": n_docs,
        "dense_backend": backend,
        "build_s": round(build_s, 1),
        "encode_p50_ms": [round(encode_before, 2), round(encode_after, 2)],
        "upsert_ms_p50": upsert_p50,
        "searchable_ms_p50": searchable_p50,
        "upsert_over_encode": round(upsert_p50 / unit, 2),
        "searchable_over_encode": round(searchable_p50 / unit, 2),
        "last_upsert_profile_ms": by_name,
        "upserts": rows,
        "delete": delete,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


#: This checkout: the tree measured when no ``--compare`` is given.
REPO = Path(__file__).resolve().parents[2]
RESULTS_PATH = REPO / "benchmarks" / "results" / "write_io.json"


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10000", help="collection sizes in passages")
    parser.add_argument("--pre-segments", type=int, default=4, help="upserts before measuring")
    parser.add_argument("--repeats", type=int, default=6, help="measured upserts")


def main() -> int:
    """The per-tree measurement, in a process of its own (``--measure TREE``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--measure", type=Path, required=True, help="print this tree's result")
    parser.add_argument("--passages", type=int, default=10000)
    _add_options(parser)
    args = parser.parse_args()
    result = measure(args.measure.resolve(), args.passages, args.pre_segments, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def command(args: argparse.Namespace, settings: Any) -> int:
    del settings  # each tree's engine runs in a process of its own, on synthetic documents
    trees = args.compare or [REPO]
    labels = ("before", "after") if args.compare else ("this",)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for size in [int(n) for n in args.sizes.split(",")]:
        for label, tree in zip(labels, trees, strict=True):
            command = [
                sys.executable, __file__, "--measure", str(tree), "--passages", str(size),
                "--pre-segments", str(args.pre_segments), "--repeats", str(args.repeats),
            ]  # fmt: skip
            print(f"{label} {size}: {' '.join(command)}", flush=True)
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(
                next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]
            )
            result["label"] = label
            print(json.dumps({k: v for k, v in result.items() if k != "upserts"}), flush=True)
            runs.append(result)
    report = {
        "command": " ".join(["lodestar", *sys.argv[1:]]),
        "started": started,
        "load_average_at_start": load_at_start,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def register(group: Any) -> None:
    """``lodestar bench write-io`` on the ``bench`` group."""
    parser = group.add_parser(
        "write-io", help="one-document upserts by I/O count and as a ratio to one query encode"
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="two source trees (e.g. git archive <commit> | tar -x -C DIR), alternated",
    )
    _add_options(parser)
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON results")
    parser.set_defaults(handler=command)


if __name__ == "__main__":
    raise SystemExit(main())
