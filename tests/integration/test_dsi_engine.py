"""The DSI engine in process on a tiny real corpus: a continual step publishes atomically, a
crashed step leaves the last good model serving, and a redelivered job resumes its epochs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.dsi.engine import DsiEngine, StepOptions
from shared.errors import LodestarError
from shared.models import get_generator
from shared.schemas import Document
from shared.settings import Settings

TOPICS = [
    ("lighthouse", "A lighthouse is a tower that emits light to guide ships at sea."),
    ("volcano", "A volcano is a rupture in the crust where lava and ash escape."),
    ("glacier", "A glacier is a persistent body of dense ice moving under its own weight."),
    ("desert", "A desert is a barren landscape where little precipitation occurs."),
    ("coral", "Coral reefs are underwater ecosystems built by colonies of coral polyps."),
    ("comet", "A comet is an icy body that releases gas when passing close to the Sun."),
    ("orchid", "Orchids are a diverse family of flowering plants with fragrant blooms."),
    ("bridge", "A suspension bridge hangs its deck below cables on vertical suspenders."),
]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As the service does on CPU: a tiny model gains nothing from threads that contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def docs(names: list[tuple[str, str]]) -> list[Document]:
    return [Document(id=name, title=name.title(), text=text) for name, text in names]


# Atomic docids need no embedder, so these tests exercise only the DSI model itself.
FAST = StepOptions(
    method="naive",
    docid="atomic",
    epochs=30,
    first_epochs=60,
    d_model=32,
    layers=1,
    batch_size=8,
    lr=3e-3,
)


def test_step_publishes_a_version_and_search_decodes_only_indexed_documents(tmp_path: Path) -> None:
    engine = DsiEngine(tmp_path)
    with pytest.raises(LodestarError) as missing:
        engine.search("tiny", "lighthouse", 3)
    assert missing.value.code == "not_found"
    first = engine.index_step("tiny", docs(TOPICS[:6]), options=FAST)
    assert first.new_documents == 6 and first.updates > 0
    snapshot, hits = engine.search("tiny", "Lighthouse. A lighthouse is a tower", 3)
    assert snapshot.version == first.version
    assert len(hits) == 3 and {doc.id for doc, _, _ in hits} <= {n for n, _ in TOPICS[:6]}
    # Memorised: every document's own prefix decodes to its own docid (the indexing task).
    correct = sum(
        engine.search("tiny", f"{name.title()}. {text}", 1)[1][0][0].id == name
        for name, text in TOPICS[:6]
    )
    assert correct >= 5

    second = engine.index_step("tiny", docs(TOPICS[4:]), options=FAST)  # 2 old, 2 new
    assert second.new_documents == 2 and second.documents == 8
    assert second.version != first.version
    snapshot, hits = engine.search("tiny", "Bridge. A suspension bridge hangs its deck", 8)
    assert snapshot.version == second.version
    assert {doc.id for doc, _, _ in hits} <= {n for n, _ in TOPICS}
    again = engine.index_step("tiny", docs(TOPICS[6:]), options=FAST)
    assert again.new_documents == 0 and again.version == second.version, "idempotent"


def test_a_crashed_step_keeps_the_last_good_model_and_a_retry_resumes(tmp_path: Path) -> None:
    engine = DsiEngine(tmp_path)
    first = engine.index_step("tiny", docs(TOPICS[:6]), options=FAST)

    class Crash(Exception):
        pass

    def crash_after_five_epochs(done: int, total: int, stage: str) -> None:
        if stage.startswith("training") and done == 5:
            raise Crash

    with pytest.raises(Crash):
        engine.index_step(
            "tiny", docs(TOPICS[6:]), options=FAST, job_id="job-1", progress=crash_after_five_epochs
        )
    family = engine.family("tiny")
    assert family.current_version() == first.version, "the crash published nothing"
    snapshot, hits = engine.search("tiny", "Orchids are a diverse family", 8)
    assert snapshot.version == first.version
    assert "orchid" not in {doc.id for doc, _, _ in hits}
    assert (family.root / "resume" / "job-1" / "state.json").exists()

    resumed = engine.index_step("tiny", docs(TOPICS[6:]), options=FAST, job_id="job-1")
    assert resumed.resumed_from_epoch == 5
    assert resumed.updates == FAST.epochs - 5  # one batch per epoch: only the missing epochs ran
    assert family.current_version() == resumed.version != first.version
    assert not (family.root / "resume" / "job-1").exists()
    _, hits = engine.search("tiny", "Orchids. Orchids are a diverse family", 8)
    assert "orchid" in {doc.id for doc, _, _ in hits}


def test_generative_memory_with_the_prompted_lm_covers_old_and_new_documents(
    tmp_path: Path, settings: Settings
) -> None:
    """genmem with ``query_generator="lm"``: the first step keeps its demonstrations (not a
    model), every document of both steps gets pseudo-queries from the real SmolLM2, and the
    second step reloads the demonstrations from the published version."""
    engine = DsiEngine(tmp_path, llm=lambda: get_generator(settings))
    memory = replace(
        FAST, method="genmem", query_generator="lm", demonstrations=2, pseudo_per_doc=1
    )
    real = [("volcano", "where does lava come from"), ("glacier", "what is a glacier made of")]
    first = engine.index_step("tiny", docs(TOPICS[:5]), queries=real, options=memory)
    version_dir = engine.family("tiny").versions_dir / first.version
    demonstrations = json.loads((version_dir / "query_prompt" / "demonstrations.json").read_text())
    assert [q for _, q in demonstrations] == [q for _, q in real]
    assert not (version_dir / "query_generator").exists()

    second = engine.index_step("tiny", docs(TOPICS[5:]), options=memory)
    version_dir = engine.family("tiny").versions_dir / second.version
    pseudo = json.loads((version_dir / "pseudo_queries.json").read_text())
    assert set(pseudo) == {name for name, _ in TOPICS}
    assert all(len(queries) == 1 and queries[0] for queries in pseudo.values())
    assert (version_dir / "query_prompt" / "demonstrations.json").exists()
    # The second step trained on more than the 3 new documents' indexing examples (one batch of
    # 8 per epoch): their pseudo-queries and replayed old ones make a second batch.
    assert second.updates > memory.epochs


def test_the_lm_query_generator_needs_an_llm(tmp_path: Path) -> None:
    memory = replace(FAST, method="genmem", query_generator="lm")
    with pytest.raises(LodestarError) as error:
        DsiEngine(tmp_path).index_step(
            "tiny", docs(TOPICS[:3]), queries=[("volcano", "what is a volcano")], options=memory
        )
    assert error.value.code == "validation"
