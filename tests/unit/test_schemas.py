"""``shared.schemas.NON_BLANK``: the OpenAPI pattern for "not blank" agrees with the services'
own rule (``str.strip`` leaves something) on every Unicode character, read as ECMA-262 reads it
(the dialect schemathesis and generated clients use)."""

from __future__ import annotations

import re

from shared.schemas import NON_BLANK


def test_the_pattern_refuses_exactly_what_strip_removes() -> None:
    # The class has only \t \r \xHH \uHHHH escapes and ranges, which Python's re reads as ECMA does.
    pattern = re.compile(NON_BLANK)
    for code in range(0x110000):
        char = chr(code)
        assert bool(pattern.fullmatch(char)) == bool(char.strip()), hex(code)
