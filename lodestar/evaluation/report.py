"""``docs/results.md`` (and its plots) from the JSON results under ``benchmarks/results/``.

The page is generated, never edited by hand: ``lodestar eval report`` rewrites it. Each table
shows the current figures beside anchors (published or reference figures on the same data, each
with its source: a paper, a leaderboard or a run), with the machine and date of the measurement.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lodestar.evaluation.common import EXPECTED_PATH, REPO_ROOT, EvalUsageError, read_json


@dataclass(frozen=True)
class Anchor:
    label: str
    values: dict[str, float]
    """Metric name (as in our results) -> published figure, on the same 0-1 scale."""
    source: str


RETRIEVAL_ANCHORS: dict[str, list[Anchor]] = {
    "scifact": [
        Anchor(
            "BM25 flat (Pyserini 2CR)",
            {"ndcg@10": 0.6789, "recall@100": 0.9253},
            "castorini/pyserini `pyserini/2cr/beir.yaml`",
        ),
        Anchor(
            "BM25 multifield (Pyserini 2CR)",
            {"ndcg@10": 0.6647, "recall@100": 0.9076},
            "castorini/pyserini `pyserini/2cr/beir.yaml`",
        ),
        Anchor(
            "BM25 + MiniLM-L6 cross-encoder",
            {"ndcg@10": 0.688},
            "BEIR paper Table 2 (arXiv 2104.08663), secondary",
        ),
        Anchor(
            "plain Okapi BM25 (k1 0.9, b 0.4, no stemming)",
            {"ndcg@10": 0.661, "recall@100": 0.885},
            "reference run, not published: SciFact title + abstract on a 2-core machine like ours",
        ),
        Anchor(
            "all-MiniLM-L6-v2 exact cosine",
            {"ndcg@10": 0.645, "recall@100": 0.925},
            "reference run, not published: SciFact title + abstract on a 2-core machine like ours",
        ),
        Anchor(
            "RRF (k = 60) of the two above",
            {"ndcg@10": 0.694},
            "reference run, not published: SciFact title + abstract on a 2-core machine like ours",
        ),
    ],
}

_FLASHRAG = "RUC-NLPIR/FlashRAG README (Llama3-8B-instruct, e5-base-v2, 5 docs)"
FLASHRAG_NOTE = (
    "FlashRAG's reader is 60 times larger (Llama3-8B-instruct) and retrieves from all of "
    "Wikipedia (e5-base-v2, 5 documents), so its figures orient; they are not like-for-like."
)
RAG_NOTES: dict[str, str] = {
    "hotpotqa-dev": (
        "The corpus pools the context paragraphs of the 300 dev questions (2 gold and up to 8 "
        "distractors each; 2,966 paragraphs), so every question's gold paragraphs are in it."
    ),
    "nq-oracle": (
        "The corpus pools the gold passages of the 2,655 oracle questions (2,600 passages), so "
        "retrieval is much easier than open-domain NQ over all of Wikipedia."
    ),
}
RAG_ANCHORS: dict[str, list[Anchor]] = {
    "hotpotqa-dev": [
        Anchor("FlashRAG naive generation (no retrieval)", {"f1": 0.284}, _FLASHRAG),
        Anchor("FlashRAG standard RAG", {"f1": 0.353}, _FLASHRAG),
        Anchor("FlashRAG IRCoT (multi-round)", {"f1": 0.415}, _FLASHRAG),
    ],
    "nq-oracle": [
        Anchor("FlashRAG naive generation (no retrieval)", {"em": 0.226}, _FLASHRAG),
        Anchor("FlashRAG standard RAG", {"em": 0.351}, _FLASHRAG),
        Anchor("FlashRAG IRCoT (multi-round)", {"em": 0.333}, _FLASHRAG),
    ],
}

RETRIEVAL_COLUMNS = (
    ("ndcg@10", "nDCG@10"),
    ("recall@10", "R@10"),
    ("recall@100", "R@100"),
    ("mrr@10", "MRR@10"),
)
RAG_COLUMNS = (("em", "EM"), ("f1", "F1"), ("acc", "Acc"), ("support_recall", "support recall"))
#: How the systems' tables print a metric, where not ``.4f`` (these are means of counts).
METRIC_FORMATS = {"rounds": ".2f", "new_tokens": ".1f"}


def _num(value: Any, spec: str = ".4f") -> str:
    return "—" if value is None else format(float(value), spec)


def _machine(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"]
    if m.get("torch_threads"):
        parts.append(f"{m['torch_threads']} torch threads")
    if m.get("cuda"):
        parts.append(f"GPU {m['cuda']}")
    return "; ".join(parts)


def _when(result: dict[str, Any]) -> str:
    commit = result.get("git_commit")
    return f"{result.get('date', '?')}" + (f", commit {commit}" if commit else "")


def _load_note(result: dict[str, Any]) -> str:
    load = result.get("load_avg_at_start")
    cores = result.get("machine", {}).get("cores")
    if not load or not cores:
        return ""
    note = f" Load average {load[0]:.1f} at the start ({cores} cores)"
    if load[0] > 0.75 * cores:
        note += ": the machine was busy with other work, so latencies include waiting for a core"
    return note + "."


def _retrieval_summary(result: dict[str, Any]) -> list[str]:
    """Plain statements: our BM25 against Pyserini's, and the best system against the rest."""
    systems = result["systems"]
    lines: list[str] = []
    pyserini = next(
        (a for a in RETRIEVAL_ANCHORS.get(result["dataset"], []) if "Pyserini" in a.label), None
    )
    if pyserini is not None and "bm25" in systems:
        ours = systems["bm25"]["metrics"]["ndcg@10"]
        delta = ours - pyserini.values["ndcg@10"]
        verdict = "within" if abs(delta) <= 0.02 else "outside"
        lines.append(
            f"- BM25 nDCG@10 {ours:.4f} is {delta:+.4f} from {pyserini.label} "
            f"({pyserini.values['ndcg@10']:.4f}): {verdict} the ±0.02 target."
        )
    if len(systems) > 1:
        best = max(systems, key=lambda name: systems[name]["metrics"]["ndcg@10"])
        for row in result.get("significance", []):
            if row["metric"] != "ndcg@10" or best not in (row["a"], row["b"]):
                continue
            other = row["b"] if row["a"] == best else row["a"]
            diff = abs(row["mean_difference"])
            lines.append(
                f"- {best} beats {other} by {diff:.4f} nDCG@10 (paired t-test p = "
                f"{row['t_test_p']:.3g}, bootstrap p = {row['bootstrap_p']:.3g})."
            )
    return lines


def _significance(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [
        "",
        "Paired significance (two-sided; t-test and bootstrap with 10,000 resamples):",
        "",
        "| a | b | metric | mean a | mean b | a − b | t-test p | bootstrap p | n |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        out.append(
            f"| {row['a']} | {row['b']} | {row['metric']} | {row['mean_a']:.4f} | "
            f"{row['mean_b']:.4f} | {row['mean_difference']:+.4f} | {row['t_test_p']:.3g} | "
            f"{row['bootstrap_p']:.3g} | {row['n']} |"
        )
    return out


def _systems_table(
    first: str,
    rows: dict[str, Any],
    columns: Sequence[tuple[str, str]],
    latency_spec: str,
) -> list[str]:
    """One row a system or method (``rows``): its metrics in ``columns`` (key, header), p50 and
    p95 latency, description."""
    lines = [
        f"| {first} | "
        + " | ".join(label for _, label in columns)
        + " | p50 ms | p95 ms | description |",
        "|---|" + "---:|" * (len(columns) + 2) + "---|",
    ]
    for name, row in rows.items():
        metrics, latency = row["metrics"], row["latency_ms"]
        cells = [_num(metrics.get(key), METRIC_FORMATS.get(key, ".4f")) for key, _ in columns]
        cells += [_num(latency["p50"], latency_spec), _num(latency["p95"], latency_spec)]
        lines.append(f"| **{name}** | " + " | ".join(cells) + f" | {row['description']} |")
    return lines


def _anchors_table(
    anchors: Sequence[Anchor], intro: str, columns: Sequence[tuple[str, str]]
) -> list[str]:
    """``intro`` and the anchors' figures in ``columns`` (key, header) with their sources;
    nothing without anchors."""
    if not anchors:
        return []
    lines = [
        "",
        intro,
        "",
        "| reference | " + " | ".join(label for _, label in columns) + " | source |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for anchor in anchors:
        cells = [_num(anchor.values.get(key)) for key, _ in columns]
        lines.append(f"| {anchor.label} | " + " | ".join(cells) + f" | {anchor.source} |")
    return lines


def retrieval_section(result: dict[str, Any], image: str | None) -> list[str]:
    dataset, split = result["dataset"], result["split"]
    lines = [
        f"## Retrieval: {dataset} {split} ({result['num_queries']} queries)",
        "",
        f"Depth {result['depth']} per query; collection `{result['collection']}` (version "
        f"{result['collection_version']}, dense backend {result.get('dense_backend', 'flat')}), "
        f"{result['backend']}; measured {_when(result)} on "
        f"{_machine(result)}; {result['wall_s']} s in all. Latency is per query, end to end "
        "through the search pipeline (query embedding included)." + _load_note(result),
        "",
        *_retrieval_summary(result),
        "",
        *_systems_table("system", result["systems"], RETRIEVAL_COLUMNS, ".1f"),
        *_anchors_table(
            RETRIEVAL_ANCHORS.get(dataset, []),
            "Anchors (published or reference figures on the same data):",
            (("ndcg@10", "nDCG@10"), ("recall@100", "R@100")),
        ),
    ]
    lines += _significance(result.get("significance", []))
    if image:
        lines += ["", f"![nDCG@10 on {dataset} {split}]({image})"]
    return [*lines, ""]


def rag_section(result: dict[str, Any], image: str | None) -> list[str]:
    dataset = result["dataset"]
    lines = [
        f"## RAG: {dataset} ({result['num_questions']} questions)",
        "",
        f"Reader {result['generator']} (greedy, at most {result['max_new_tokens']} new tokens); "
        f"retrieval over collection `{result['collection']}` (the dataset's pooled corpus), "
        f"top {result['k']}; {result['backend']}; measured {_when(result)} on "
        f"{_machine(result)}; {result['wall_s']} s in all.{_load_note(result)}",
        "",
        "EM and F1 use SQuAD normalisation; Acc counts an answer correct when a normalised gold "
        "answer occurs in it as whole words (lost-in-the-middle's best-subspan EM); support recall "
        "is the share of the question's gold supporting documents among those retrieved. "
        + RAG_NOTES.get(dataset, ""),
        "",
        *_systems_table(
            "method",
            result["methods"],
            (*RAG_COLUMNS, ("rounds", "rounds"), ("new_tokens", "tokens")),
            ".0f",
        ),
    ]
    ems = [row["metrics"].get("em") for row in result["methods"].values()]
    if ems and all(em is not None and em < 0.05 for em in ems):
        lines += [
            "",
            'Exact match is near 0 because the 135M reader answers in sentences ("The first '
            'Nobel Prize in Physics was awarded to ...") whatever the prompt asks; F1 and Acc '
            "are the informative figures for it.",
        ]
    lines += _anchors_table(
        RAG_ANCHORS.get(dataset, []), f"Anchors. {FLASHRAG_NOTE}", (("em", "EM"), ("f1", "F1"))
    )
    lines += _significance(result.get("significance", []))
    if image:
        lines += ["", f"![EM, F1 and Acc on {dataset}]({image})"]
    return [*lines, ""]


def expected_section(path: Path) -> list[str]:
    from lodestar.evaluation.expected import load_expected

    if not path.is_file():
        return []
    rows = load_expected(path)
    lines = [
        "## Expected figures checked by `lodestar eval check`",
        "",
        f"From `{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}`: "
        "`lodestar eval check --ci` re-measures the ci rows (CI), `lodestar eval check` all of "
        "them, and fails when a figure leaves expected ± tolerance.",
        "",
        "| row | metric | expected | tolerance | ci |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        for m in row.metrics:
            lines.append(
                f"| {row.id} | {m.metric} | {m.expected:.4f} | {m.tolerance:.4f} | "
                f"{'yes' if row.ci else 'no'} |"
            )
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _save_plot(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Without the "Software" entry (matplotlib's version) the PNG does not change with it.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_retrieval(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    for name, row in result["systems"].items():
        labels.append(f"Lodestar {name}")
        values.append(float(row["metrics"]["ndcg@10"]))
        colors.append("#1f77b4")
    for anchor in RETRIEVAL_ANCHORS.get(result["dataset"], []):
        if "ndcg@10" in anchor.values:
            labels.append(anchor.label)
            values.append(anchor.values["ndcg@10"])
            colors.append("#9e9e9e")
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.2))
    positions = list(range(len(labels)))[::-1]
    ax.barh(positions, values, color=colors)
    ax.set_yticks(positions, labels, fontsize=8)
    low = min(values) - 0.05
    ax.set_xlim(max(0.0, low), min(1.0, max(values) + 0.03))
    for y, v in zip(positions, values, strict=True):
        ax.text(v + 0.002, y, f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlabel("nDCG@10")
    ax.set_title(f"{result['dataset']} {result['split']}: Lodestar (blue) vs anchors (grey)")
    _save_plot(fig, path)


def plot_rag(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    metrics = (("em", "EM"), ("f1", "F1"), ("acc", "Acc"))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    top = 0.1
    for i, (key, label) in enumerate(metrics):
        values = [float(result["methods"][m]["metrics"].get(key) or 0.0) for m in methods]
        offset = (i - (len(metrics) - 1) / 2) * width
        xs = [x + offset for x in range(len(methods))]
        ax.bar(xs, values, width=width, label=label)
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v + 0.005, f"{v:.3f}", ha="center", fontsize=8)
        top = max(top, *values)
    ax.set_xticks(list(range(len(methods))), methods)
    ax.set_ylim(0, top * 1.25)
    ax.set_title(f"{result['dataset']}, {result['num_questions']} questions")
    ax.legend()
    _save_plot(fig, path)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


EVAL_KINDS = ("retrieval", "rag")


SOURCE_KEY = "_source"  # the results file's stem, added by ``load_results``


def load_results(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The evaluation results (retrieval first, then RAG; each sorted by dataset, RAG then by
    size) and the names of the other JSON files there (other benchmarks' outputs), not used."""
    if not results_dir.is_dir():
        raise EvalUsageError(f"results folder not found: {results_dir}")
    results: list[dict[str, Any]] = []
    others: list[str] = []
    for path in sorted(results_dir.glob("*.json")):
        data = read_json(path)
        if data.get("kind") in EVAL_KINDS:
            results.append({**data, SOURCE_KEY: path.stem})
        else:
            others.append(path.name)
    if not results:
        raise EvalUsageError(
            f"no results in {results_dir}; run `lodestar eval retrieval` or `lodestar eval rag`"
        )
    order = {"retrieval": 0, "rag": 1}
    ordered = sorted(
        results,
        key=lambda r: (
            order.get(r.get("kind", ""), 2),
            r.get("dataset", ""),
            r.get("split", ""),
            r.get("num_questions", 0),
        ),
    )
    return ordered, others


def render_report(
    results: Sequence[dict[str, Any]],
    *,
    images: dict[int, str] | None = None,
    expected_path: Path | None = EXPECTED_PATH,
    today: str | None = None,
) -> str:
    images = images or {}
    today = today or _dt.date.today().isoformat()
    machines = sorted({_machine(r) for r in results})
    lines = [
        "# Lodestar results",
        "",
        f"Generated by `lodestar eval report` from `benchmarks/results/*.json` on {today}; do not "
        "edit by hand. Reproduce any table with the command named in its section; the JSON files "
        "hold every per-query figure for significance tests.",
        "",
        "Machine(s): " + "; ".join(machines) + ".",
        "",
        "Commands:",
        "",
        "```",
        "lodestar eval retrieval --dataset scifact --systems dense,bm25,rrf --split test",
        "lodestar eval rag --dataset hotpotqa-dev --methods none,single [--limit N]",
        "lodestar eval rag --dataset nq-oracle --methods none,single [--limit N]",
        "lodestar eval check --ci      # the cheap rows, as CI runs them",
        "lodestar eval report          # this page",
        "```",
        "",
    ]
    for index, result in enumerate(results):
        kind = result.get("kind")
        if kind == "retrieval":
            lines += retrieval_section(result, images.get(index))
        elif kind == "rag":
            lines += rag_section(result, images.get(index))
    if expected_path is not None:
        lines += expected_section(expected_path)
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    results_dir: Path, out: Path, *, image_dir: Path | None = None, plots: bool = True
) -> tuple[Path, list[str]]:
    """Write the page to ``out`` and its plots to ``image_dir`` (default ``<out folder>/img``).
    Returns the page and the JSON files of the results folder that are not evaluation results."""
    results, others = load_results(results_dir)
    image_dir = image_dir or out.parent / "img"
    images: dict[int, str] = {}
    if plots:
        for index, result in enumerate(results):
            # Named after the results file: two runs on the same data (say 30 queries and all
            # of them, or two RAG runs of 100 questions) each keep their own plot.
            name = f"{result[SOURCE_KEY]}.png"
            if result.get("kind") == "retrieval":
                plot_retrieval(result, image_dir / name)
            elif result.get("kind") == "rag":
                plot_rag(result, image_dir / name)
            else:
                continue
            target = image_dir / name
            try:
                images[index] = str(target.resolve().relative_to(out.parent.resolve()))
            except ValueError:
                images[index] = str(target.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_report(results, images=images), encoding="utf-8")
    tmp.replace(out)
    return out, others
