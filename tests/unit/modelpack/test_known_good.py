"""The known-good inputs the fault classification runs again: by shape class (the batch dim
included), bounded in count and bytes, golden samples as the fallback."""

from __future__ import annotations

import numpy as np

from modelpack.serving import faults
from modelpack.serving.faults import KnownGood, shape_class


def test_the_shape_class_includes_the_batch_dim_and_the_dtype() -> None:
    one, three = np.zeros((1, 4), np.float32), np.zeros((3, 4), np.float32)
    assert shape_class({"x": one}) != shape_class({"x": three})
    assert shape_class({"x": one}) != shape_class({"x": one.astype(np.float64)})


def test_a_class_that_ran_is_its_own_reference_else_the_golden_samples() -> None:
    golden = {"x": np.ones((3, 4), np.float32)}
    known = KnownGood(golden)
    seen = {"x": np.full((2, 4), 7, np.float32)}
    known.remember(seen)
    seen["x"][:] = 0  # the caller's buffer is reused: the kept copy must not change
    found = known.reference({"x": np.zeros((2, 4), np.float32)})
    assert found is not None and (found[1]["x"] == 7).all()
    other = known.reference({"x": np.zeros((5, 4), np.float32)})
    assert other is not None and other[1] is not None and other[1]["x"].shape == (3, 4)


def test_the_smallest_input_that_ran_is_the_last_resort() -> None:
    known = KnownGood()
    assert known.reference({"x": np.zeros((1, 4), np.float32)}) is None
    known.remember({"x": np.zeros((8, 4), np.float32)})
    known.remember({"x": np.zeros((2, 4), np.float32)})
    found = known.reference({"x": np.zeros((5, 4), np.float32)})
    assert found is not None and found[1]["x"].shape == (2, 4)


def test_what_is_kept_is_bounded_in_classes_and_bytes() -> None:
    known = KnownGood()
    for rows in range(1, faults.MAX_CLASSES + 50):
        known.remember({"x": np.zeros((rows, 4), np.float32)})
    assert len(known._by_class) == faults.MAX_CLASSES
    big = KnownGood()
    per = faults.MAX_KEPT_BYTES // 4  # float32 elements of the largest input kept
    for rows in range(1, 40):
        big.remember({"x": np.zeros((rows, per // rows), np.float32)})
    assert big._bytes <= faults.MAX_TOTAL_BYTES
    assert big._bytes == sum(v["x"].nbytes for v in big._by_class.values())
    big.remember({"x": np.zeros((1, per + 1), np.float32)})  # over the per-input cap: not kept
    assert shape_class({"x": np.zeros((1, per + 1), np.float32)}) not in big._by_class


def test_the_reference_runs_again_for_every_failure() -> None:
    """No verdict is kept: a model that fails now and then fails its reference now and then,
    and each of those failures is the model's."""
    known = KnownGood({"x": np.ones((1, 4), np.float32)})
    outcomes = iter([True, False, True, False])
    calls: list[bool] = []

    def flaky(feed: dict[str, np.ndarray]) -> None:
        calls.append(True)
        if not next(outcomes):
            raise RuntimeError("out of memory")

    probe = {"x": np.zeros((1, 4), np.float32)}
    assert [known.still_runs(probe, flaky) for _ in range(4)] == [True, False, True, False]
    assert len(calls) == 4
