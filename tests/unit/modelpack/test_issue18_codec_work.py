"""The time half of issue 18's codec bound, counted without a clock: the work of decoding a
zero-size tensor and writing its answer in every form the targets use does not grow with the
dims that hold nothing. Work is counted as the function calls made (Python's and the C
functions Python calls), which no busy machine changes: a request of shape ``[3, 0, 2**40]``
costs exactly the calls of ``[3, 0, 1]``, for every dtype, in tensor JSON and OIP. A loop in C
over a shape's nominal size makes no calls: the memory it would need is what
test_codec_bounds.py's property bounds, and a shape of 2**40 answered at all (the integration
tests) shows none runs. The property found that an empty OIP ``data`` list was refused for
BOOL (numpy reads ``[]`` as float64), where every other dtype took it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack import decode_request, encode_response, parse_body
from modelpack.codec import MAX_EMPTY_LISTS, dumps
from modelpack.manifest import TensorSpec
from modelpack.serving import oip
from modelpack.serving.limits import ServingLimits

LIMITS = ServingLimits()
DTYPES = list(oip.DATATYPES.values())


def _calls(shape: list[int], dtype: str, body_form: str) -> int:
    """The calls made to decode a request of ``shape`` (zero-size) and write its answer as
    tensor JSON (lists and b64), OIP JSON and the binary extension."""
    spec = {"x": TensorSpec(name="x", dtype=dtype, shape=[None] * len(shape))}
    if body_form == "b64":
        tensor: Any = {"dtype": dtype, "shape": shape, "b64": ""}
        body = json.dumps({"inputs": {"x": tensor}}).encode()
    else:
        kind = next(k for k, v in oip.DATATYPES.items() if v == dtype)
        tensor = {"name": "x", "shape": shape, "datatype": kind, "data": []}
        body = json.dumps({"inputs": [tensor]}).encode()
    model = {"name": "m", "version": 1}

    def work() -> None:
        doc = parse_body(body, LIMITS)
        if body_form == "b64":
            feed = decode_request(doc, spec, LIMITS)
        else:
            feed = oip.decode(doc, None, spec, ["y"], LIMITS).inputs
        out = {"y": feed["x"]}
        dumps(encode_response(out, model, 1.0, body=True))
        dumps(encode_response(out, model, 1.0, binary=True))
        request = oip.OipRequest(feed, None, False)
        dumps(oip.answer_doc(request, out, "m", "1", body=True)[0])

    work()  # caches and templates warm: what is counted is one more request
    counts = []
    for _ in range(2):  # the fewer: a tracer of hypothesis's own may add calls to one run
        count = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal count
            if event in ("call", "c_call"):
                count += 1

        sys.setprofile(profile)
        try:
            work()
        finally:
            sys.setprofile(None)
        counts.append(count)
    return min(counts)


@st.composite
def _zero_size(draw: st.DrawFn) -> list[int]:
    """A shape with a zero: dims before it small (their nested lists are real text), dims
    after it anything up to 2**40 (they hold nothing)."""
    rank = draw(st.integers(2, 5))
    zero = draw(st.integers(0, rank - 2))
    before = draw(st.lists(st.integers(1, 4), min_size=zero, max_size=zero))
    after = draw(
        st.lists(st.integers(1, 2**40), min_size=rank - zero - 1, max_size=rank - zero - 1)
    )
    # numpy's own limit on any array (then a 413), over every dim but the zero: the dims
    # before it count too (a shape of 4 x 0 x 2**60 was past it, and the property failed)
    while math.prod(before) * math.prod(after) * 8 >= 2**62:
        largest = after.index(max(after))
        after[largest] = max(1, after[largest] >> 20)
    shape = [*before, 0, *after]
    return shape


@settings(max_examples=100, deadline=None)
@given(shape=_zero_size(), dtype=st.sampled_from(DTYPES), body_form=st.sampled_from(["b64", "oip"]))
def test_a_zero_size_tensor_costs_the_same_calls_whatever_its_empty_dims(
    shape: list[int], dtype: str, body_form: str
) -> None:
    first_zero = shape.index(0)
    small = [*shape[: first_zero + 1], *[1] * (len(shape) - first_zero - 1)]
    assert math.prod(shape[:first_zero]) <= MAX_EMPTY_LISTS
    assert _calls(shape, dtype, body_form) == _calls(small, dtype, body_form), (shape, small)
