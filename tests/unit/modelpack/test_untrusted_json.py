"""modelpack.untrusted_json: whatever the bytes, a JSON value or NotJsonError, never another
exception (a 5,000-digit integer raised ValueError and deep nesting RecursionError, which the
readers that caught only JSONDecodeError let through)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.sealed import parse
from modelpack.errors import StoreError
from modelpack.untrusted_json import NotJsonError, loads

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)

HOSTILE = {
    "a 5,000-digit integer": b'{"n": ' + b"1" * 5000 + b"}",
    "arrays 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "objects 100,000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "not UTF-8": b'{"a": "\xff\xfe\xfd"}',
    "truncated": b'{"a": [1, 2',
}


@given(JSON_VALUES, st.booleans())
def test_any_json_value_reads_as_json_loads_reads_it(value: object, finite: bool) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert loads(text.encode(), finite=finite) == json.loads(text)
        assert loads(text, finite=finite) == json.loads(text)


@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_give_a_value_or_not_json(data: bytes, finite: bool) -> None:
    try:
        loads(data, finite=finite)
    except NotJsonError as exc:
        assert "\n" not in str(exc)


@given(st.integers(min_value=4301, max_value=20_000), st.sampled_from(["[", '{"k":']))
def test_a_long_integer_or_deep_nesting_is_not_json(size: int, opener: str) -> None:
    with pytest.raises(NotJsonError, match="too many digits"):
        loads(f"[{'7' * size}]", "doc")
    closer = "]" if opener == "[" else "}"
    with pytest.raises(NotJsonError, match="nested too deep"):
        loads(opener * size + "0" + closer * size, "doc")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_document_is_refused_with_its_name(name: str) -> None:
    with pytest.raises(NotJsonError, match=r"^rollouts/r1\.json is not JSON: "):
        loads(HOSTILE[name], "rollouts/r1.json")
    # ... and a ValueError still, for callers that caught that around json.loads
    with pytest.raises(ValueError):
        loads(HOSTILE[name], "rollouts/r1.json", finite=True)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_finite_refuses_what_is_not_a_finite_number(literal: str) -> None:
    loose = loads(f'{{"accuracy": {literal}}}')["accuracy"]
    assert math.isnan(loose) or math.isinf(loose)
    with pytest.raises(NotJsonError, match=r"report\.json is not JSON"):
        loads(f'{{"accuracy": {literal}}}', "report.json", finite=True)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_sealed_document_that_is_not_json_is_a_store_error(name: str) -> None:
    """The readers of identity records, CRL indexes and rollouts catch StoreError."""
    with pytest.raises(StoreError, match=r"^devices/d1\.json is not JSON"):
        parse(HOSTILE[name], "devices/d1.json")
