"""What a message says back of a client's text is bounded: ``clip`` and ``first_problem``
(modelpack.errors). Before, ``first_problem`` quoted an unknown field's name whole: a 10 KiB name
made a 10 KiB refusal (30 KiB as JSON escapes) and a telemetry record as large."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError

from modelpack.errors import MAX_ECHO_CHARS, MAX_LOC_PARTS, clip, first_problem

MARKER = re.compile(r"…\(\+(\d+) chars\)")


@settings(max_examples=500)
@given(text=st.text(max_size=3000), limit=st.integers(24, 2000))
def test_a_clipped_text_fits_its_bound_and_says_what_it_left_out(text: str, limit: int) -> None:
    out = clip(text, limit)
    if len(text) <= limit:
        assert out == text
        return
    assert len(out) <= limit
    marker = _the_marker(out, text, list(MARKER.finditer(out)))
    head, tail = out[: marker.start()], out[marker.end() :]
    assert len(head) >= len(tail)  # the start, which names a thing first, gets more room


def _the_marker(out: str, text: str, found: list[re.Match[str]]) -> re.Match[str]:
    """The marker clip wrote: the text's start before it, its end after it, and N the
    characters between them (the text itself may hold something like a marker)."""
    for m in found:
        head, tail = out[: m.start()], out[m.end() :]
        adds_up = len(head) + int(m[1]) + len(tail) == len(text)
        if adds_up and text.startswith(head) and text.endswith(tail):
            return m
    raise AssertionError(out)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    nested: dict[str, dict[str, dict[str, dict[str, dict[str, dict[str, int]]]]]] = {}


NAMES = st.text(min_size=1, max_size=20_000).filter(lambda n: n not in ("id", "nested"))


@settings(max_examples=100)
@given(name=NAMES)
def test_an_unknown_fields_name_is_named_within_a_bound(name: str) -> None:
    try:
        _Strict.model_validate({"id": "a", name: 1})
    except ValidationError as exc:
        problem = first_problem(exc, "request")
    assert problem.endswith(": Extra inputs are not permitted")
    where = problem.removesuffix(": Extra inputs are not permitted")
    assert where == clip(name) and len(where) <= MAX_ECHO_CHARS


@settings(max_examples=50)
@given(keys=st.lists(st.text(min_size=1, max_size=5000), min_size=6, max_size=6))
def test_a_deep_location_is_named_within_a_bound(keys: list[str]) -> None:
    doc: object = "not a number"
    for key in reversed(keys):
        doc = {key: doc}
    try:
        _Strict.model_validate({"id": "a", "nested": doc})
    except ValidationError as exc:
        problem = first_problem(exc, "request")
    where = problem.split(": Input should be")[0]
    assert len(where) <= (MAX_ECHO_CHARS + 1) * MAX_LOC_PARTS + 40, problem
    assert where.startswith("nested.")
