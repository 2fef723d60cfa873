"""Constrained decoding never leaves the corpus: every body n-gram it returns occurs in the
FM-index, every title is a whole real title; diverse groups obey the same mask.

The generator here is a tiny randomly initialised Llama with SmolLM2's tokenizer (the real
``CausalLM`` code path, weights that favour no corpus): random preferences are the hardest case
for the mask, since nothing but the constraint keeps the beams inside the corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.fmindex.corpus import BODY_MARKER, TITLE_MARKER, Markers, encode_documents
from services.fmindex.decoding import CausalLM, SearchConfig, constrained_beam_search
from services.fmindex.fm import FMIndex
from shared.schemas import Document
from tests.conftest import MODELS_DIR

DOCS = [
    Document(id="a", title="Eiffel Tower", text="A wrought-iron lattice tower in Paris, France."),
    Document(id="b", title="Photosynthesis", text="Plants turn light, water and CO2 into sugar."),
    Document(id="c", title="Isaac Newton", text="Newton formulated the laws of motion."),
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shared.models import LLM_DIRNAME

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / LLM_DIRNAME)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    directory: Path = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return CausalLM(directory, threads=1)


@pytest.fixture(scope="module")
def corpus(tiny_lm: CausalLM) -> tuple[FMIndex, list[int], Markers]:
    tokens, _starts = encode_documents(tiny_lm.tokenizer, DOCS)
    fm, _ = FMIndex.build(tokens)
    return fm, tokens.tolist(), Markers(tiny_lm.tokenizer)


def occurs(stream: list[int], ngram: tuple[int, ...]) -> bool:
    m = len(ngram)
    return any(tuple(stream[i : i + m]) == ngram for i in range(len(stream) - m + 1))


@pytest.mark.parametrize(("groups", "penalty"), [(1, 0.0), (3, 0.5)])
def test_body_ngrams_always_occur(
    tiny_lm: CausalLM, corpus: tuple[FMIndex, list[int], Markers], groups: int, penalty: float
) -> None:
    fm, stream, markers = corpus
    for query in ("who built the tower?", "sugar from light", "laws of motion"):
        result = constrained_beam_search(
            tiny_lm,
            fm,
            tiny_lm.encode(query + BODY_MARKER),
            SearchConfig(
                beam=6,
                max_length=6,
                groups=groups,
                diversity_penalty=penalty,
                banned=frozenset({markers.separator}),
            ),
        )
        assert result.ngrams, "decoding produced nothing"
        assert max(len(n.tokens) for n in result.ngrams) == 6
        for ngram in result.ngrams:
            assert occurs(stream, ngram.tokens), ngram
            assert fm.count(ngram.tokens) > 0
            assert markers.separator not in ngram.tokens
            assert ngram.logprob <= 0


def test_diverse_groups_spread_over_more_first_tokens(
    tiny_lm: CausalLM, corpus: tuple[FMIndex, list[int], Markers]
) -> None:
    fm, _stream, markers = corpus
    prompt = tiny_lm.encode("tower" + BODY_MARKER)
    banned = frozenset({markers.separator})
    plain = constrained_beam_search(
        tiny_lm, fm, prompt, SearchConfig(beam=6, max_length=1, banned=banned)
    )
    diverse = constrained_beam_search(
        tiny_lm,
        fm,
        prompt,
        SearchConfig(beam=6, max_length=1, groups=6, diversity_penalty=100.0, banned=banned),
    )
    # With one beam per group and a prohibitive Hamming penalty, no first token repeats.
    firsts = [n.tokens[0] for n in diverse.ngrams]
    assert len(firsts) == len(set(firsts)) == 6
    assert {n.tokens for n in plain.ngrams} <= {(t,) for t in fm.occurring_tokens.tolist()}


def test_titles_are_whole_real_titles(
    tiny_lm: CausalLM, corpus: tuple[FMIndex, list[int], Markers]
) -> None:
    fm, stream, markers = corpus
    result = constrained_beam_search(
        tiny_lm,
        fm,
        tiny_lm.encode("newton" + TITLE_MARKER),
        SearchConfig(beam=4, max_length=12, banned=frozenset({markers.separator})),
        start=fm.range([markers.separator]),
        eos=markers.title_eos,
    )
    titles = {tiny_lm.tokenizer.decode(list(n.tokens[:-1])).strip() for n in result.ngrams}
    assert titles and titles <= {d.title for d in DOCS}
    for ngram in result.ngrams:
        assert ngram.tokens[-1] == markers.title_eos
        assert occurs(stream, (markers.separator, *ngram.tokens))
