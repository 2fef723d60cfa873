"""FanOutQA dev questions shipped by the ``fanoutqa`` package, and its answer renderings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.datasets.errors import DatasetError
from shared.datasets.packages import package_data_dir
from shared.datasets.readers import _field, _read_json, _str_list
from shared.schemas import QAExample


def _check_answer(value: Any, path: Path, record: str, *, top: bool = True) -> None:
    if isinstance(value, str | int | float):  # bool is an int
        return
    if top and isinstance(value, list):
        for item in value:
            _check_answer(item, path, record, top=False)
        return
    if top and isinstance(value, dict):
        for item in value.values():
            _check_answer(item, path, record, top=False)
        return
    raise DatasetError(path, f"unsupported answer value {value!r}", record=record)


def _primitive_text(value: str | int | float) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def fanoutqa_answer_text(answer: Any) -> str:
    """One reference string for a FanOutQA answer, as ``fanoutqa.eval.utils.str_answer`` makes it.

    A list becomes its items one per line; a dict ``key - value`` lines; ``True``/``False`` become
    ``yes``/``no``; numbers ``str()``.
    """
    if isinstance(answer, list):
        return "\n".join(fanoutqa_answer_text(item) for item in answer)
    if isinstance(answer, dict):
        return "\n".join(f"{k} - {fanoutqa_answer_text(v)}" for k, v in answer.items())
    return _primitive_text(answer)


def fanoutqa_answer_parts(answer: Any) -> list[str]:
    """Every string a complete answer must contain, as FanOutQA's accuracy metric counts them:
    the items of a list, the keys then the values of a dict, or the one primitive."""
    if isinstance(answer, list):
        return [part for item in answer for part in fanoutqa_answer_parts(item)]
    if isinstance(answer, dict):
        return [str(k) for k in answer] + [
            part for v in answer.values() for part in fanoutqa_answer_parts(v)
        ]
    return [_primitive_text(answer)]


def _evidence_titles(decomposition: list[Any], path: Path, record: str) -> list[str]:
    titles: list[str] = []
    for sub in decomposition:
        if not isinstance(sub, dict):
            raise DatasetError(path, "decomposition entries must be objects", record=record)
        evidence = sub.get("evidence")
        if isinstance(evidence, dict) and isinstance(evidence.get("title"), str):
            titles.append(evidence["title"])
        elif evidence is not None:
            raise DatasetError(path, "evidence must be null or have a title", record=record)
        nested = sub.get("decomposition", [])
        if not isinstance(nested, list):
            raise DatasetError(path, "decomposition must be a list", record=record)
        titles.extend(_evidence_titles(nested, path, record))
    return titles


def read_fanoutqa(path: Path) -> list[QAExample]:
    """FanOutQA dev questions from a ``fanout-final-dev.json`` (a JSON list of questions).

    FanOutQA answers are compound: a string, number or boolean, a list (every item is needed) or
    a dict (entity -> value; every pair is needed). Splitting a list or dict into alternative
    answers would let a one-item reply score EM 1, so ``answers`` holds ONE reference string, the
    same rendering FanOutQA's own string metrics use (:func:`fanoutqa_answer_text`: items or
    ``key - value`` pairs one per line, booleans as yes/no). EM against it is therefore only
    meaningful for primitive answers; token F1 is meaningful for all. Metadata keeps
    ``answer`` (the raw value), ``answer_parts`` (:func:`fanoutqa_answer_parts`, for FanOutQA's
    loose/strict accuracy: the share of parts found in the generation), ``categories`` and the
    human ``decomposition``. ``supporting_doc_ids`` lists the Wikipedia titles cited as evidence
    by the decomposition (each once, in order): they match ids of the ``wiki`` corpus when that
    article is among its summaries, which is not guaranteed.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, "expected a JSON list of questions")
    examples: list[QAExample] = []
    seen: dict[str, int] = {}
    for index, obj in enumerate(data):
        record = f"#{index}"
        if not isinstance(obj, dict):
            raise DatasetError(path, "expected a JSON object", record=record)
        qid = _field(obj, "id", str, path, record=record)
        record = f"#{index} (id {qid!r})"
        if qid in seen:
            raise DatasetError(path, f"duplicate id (first at #{seen[qid]})", record=record)
        seen[qid] = index
        question = _field(obj, "question", str, path, record=record)
        if "answer" not in obj:
            raise DatasetError(path, "missing field 'answer'", record=record)
        answer = obj["answer"]
        _check_answer(answer, path, record)
        categories = (
            _str_list(obj, "categories", path, record=record) if "categories" in obj else []
        )
        decomposition = _field(obj, "decomposition", list, path, record=record)
        examples.append(
            QAExample(
                id=qid,
                question=question,
                answers=[fanoutqa_answer_text(answer)],
                supporting_doc_ids=list(
                    dict.fromkeys(_evidence_titles(decomposition, path, record))
                ),
                metadata={
                    "answer": answer,
                    "answer_parts": fanoutqa_answer_parts(answer),
                    "categories": categories,
                    "decomposition": decomposition,
                },
            )
        )
    return examples


def load_fanoutqa_dev() -> list[QAExample]:
    """The 310 FanOutQA dev questions shipped by the ``fanoutqa`` package (CC BY-SA 4.0)."""
    return read_fanoutqa(package_data_dir("fanoutqa") / "data" / "fanout-final-dev.json")
