"""Round-1 sub-query edits for a rerun from ``decompose``: ids stay stable, new ids never reuse
an old one, and edits that leave nothing searchable are 422s."""

from __future__ import annotations

import pytest

from services.orchestrator.decompose import SubQuery
from services.orchestrator.rerun import edit_subqueries
from shared.errors import LodestarError

PARENT = [
    SubQuery("sq1", "capital of France", 0, 1, "question"),
    SubQuery("sq2", "Mona Lisa museum", 1, 1, "decomposed"),
    SubQuery("sq3", "Louvre city", 2, 1, "decomposed"),
]


def texts(edits: list[dict[str, object]]) -> list[tuple[str, str, int]]:
    return [(sq.sq_id, sq.text, sq.order) for sq in edit_subqueries(PARENT, edits).subqueries]


def test_edit_add_delete_reorder_apply_in_order_with_stable_ids() -> None:
    edits: list[dict[str, object]] = [
        {"action": "edit", "sq_id": "sq2", "text": "  where is the  Mona Lisa "},
        {"action": "delete", "sq_id": "sq3"},
        {"action": "add", "text": "Paris"},
        {"action": "reorder", "sq_id": "sq1", "order": 5},
    ]
    assert texts(edits) == [
        ("sq2", "where is the Mona Lisa", 0),
        ("sq4", "Paris", 1),
        ("sq1", "capital of France", 2),
    ]
    edited = edit_subqueries(PARENT, edits).subqueries
    assert [sq.origin for sq in edited] == ["user", "user", "question"]


def test_an_added_sub_query_goes_where_order_says() -> None:
    assert texts([{"action": "add", "text": "Leonardo", "order": 0}])[0] == ("sq4", "Leonardo", 0)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([{"action": "edit", "sq_id": "sq1", "text": " "}], "non-empty text"),
        ([{"action": "add"}], "non-empty text"),
        ([{"action": "edit", "sq_id": "sq7", "text": "x"}], "not in this trace"),
        ([{"action": "delete"}], "needs sq_id"),
        ([{"action": "delete", "sq_id": f"sq{n}"} for n in (1, 2, 3)], "leave no sub-query"),
        ([{"action": "edit", "sq_id": "sq3", "text": "Mona Lisa Museum"}], "same text"),
    ],
)
def test_bad_edits_are_422s_on_the_overrides_field(
    edits: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(LodestarError) as raised:
        edit_subqueries(PARENT, edits)
    assert message in raised.value.message
    assert raised.value.field == "overrides.subqueries"
