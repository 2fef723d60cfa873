"""Generative memory's pseudo-queries from the real pretrained SmolLM2-135M-Instruct, prompted with
real (document, question) demonstrations: every document gets a question-shaped query, the greedy
first query is reproducible, and extra samples never repeat one."""

from __future__ import annotations

import re

from services.dsi.continual import generate_pseudo_queries_lm
from shared.models import get_generator
from shared.schemas import Document
from shared.settings import Settings

DEMONSTRATIONS = [
    (
        "Eiffel Tower. The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in "
        "Paris, France. It is named after the engineer Gustave Eiffel.",
        "who is the eiffel tower named after",
    ),
    (
        "Photosynthesis. Photosynthesis is the process by which plants use sunlight, water and "
        "carbon dioxide to create oxygen and energy in the form of sugar.",
        "what do plants produce during photosynthesis",
    ),
]

QUESTION_WORDS = {"what", "who", "which", "when", "where", "was", "the", "and", "are"}

DOCS = [
    Document(
        id="everest",
        title="Mount Everest",
        text="Mount Everest is Earth's highest mountain above sea level, located in the "
        "Mahalangur Himal sub-range of the Himalayas on the border of Nepal and China.",
    ),
    Document(
        id="beethoven",
        title="Ludwig van Beethoven",
        text="Ludwig van Beethoven was a German composer and pianist. He wrote nine symphonies, "
        "and his Ninth Symphony ends with the Ode to Joy.",
    ),
]


def test_every_document_gets_distinct_question_shaped_queries(settings: Settings) -> None:
    generator = get_generator(settings)
    done: list[int] = []
    pseudo = generate_pseudo_queries_lm(
        generator, DOCS, 3, DEMONSTRATIONS, progress=lambda n, _total: done.append(n)
    )
    assert done == [1, 2]
    assert set(pseudo) == {"everest", "beethoven"}
    for queries in pseudo.values():
        assert 1 <= len(queries) <= 3
        assert len(set(queries)) == len(queries)
        assert all(q and "\n" not in q for q in queries)
    # The greedy query asks about its passage: it shares a content word with it. (Sampled ones
    # vary from run to run, so only their shape is checked.)
    for doc in DOCS:
        passage_words = set(re.findall(r"[a-z]{3,}", f"{doc.title} {doc.text}".lower()))
        query_words = set(re.findall(r"[a-z]{3,}", pseudo[doc.id][0].lower()))
        assert query_words & passage_words - QUESTION_WORDS

    again = generate_pseudo_queries_lm(generator, DOCS, 1, DEMONSTRATIONS)
    assert {k: v[:1] for k, v in pseudo.items()} == again  # the first query is greedy
