from __future__ import annotations

import numpy as np
import pytest

from modelpack import Pack
from modelpack.errors import ManifestError
from modelpack.serving.padding import cut_outputs, pad_feeds, sequence_axis
from tests.unit.bentos.seqmodel import tokens


def test_the_plan_follows_the_symbolic_dim_to_mask_and_per_token_outputs(seq_pack: Pack) -> None:
    plan = sequence_axis(seq_pack.manifest)
    assert plan is not None
    assert plan.inputs == {"input_ids": 1, "attention_mask": 1}
    assert plan.outputs == {"hidden": 1}  # pooled has no sequence axis: never cut


def test_a_manifest_without_sequence_inputs_has_no_plan(mlp_pack: Pack) -> None:
    assert sequence_axis(mlp_pack.manifest) is None


def test_a_batch_is_padded_only_to_its_longest_member(seq_pack: Pack) -> None:
    plan = sequence_axis(seq_pack.manifest)
    assert plan is not None
    feeds = [tokens(3, 1), tokens(7, 2), tokens(5, 3)]
    padded, lengths = pad_feeds(feeds, plan)
    assert lengths == [3, 7, 5]
    assert {f["input_ids"].shape for f in padded} == {(1, 7)}
    short = padded[0]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0]]
    assert short["input_ids"][0, 3:].tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(short["input_ids"][:, :3], feeds[0]["input_ids"])


def test_outputs_are_cut_back_to_the_request_length(seq_pack: Pack) -> None:
    plan = sequence_axis(seq_pack.manifest)
    assert plan is not None
    outputs = {"hidden": np.ones((1, 7, 4)), "pooled": np.ones((1, 4))}
    cut = cut_outputs(outputs, 3, plan)
    assert cut["hidden"].shape == (1, 3, 4)
    assert cut["pooled"].shape == (1, 4)


def test_a_sequence_axis_the_input_does_not_have_is_a_manifest_error(seq_pack: Pack) -> None:
    from modelpack import SequenceInput

    broken = seq_pack.manifest.model_copy(
        update={"sequence": [SequenceInput(input="input_ids", axis=5)]}
    )
    with pytest.raises(ManifestError, match="no axis 5"):
        sequence_axis(broken)


def test_a_batch_of_mixed_lengths_is_split_into_runs_of_similar_length() -> None:
    from modelpack.serving.padding import split_by_length

    lengths = [3, 60, 4, 3, 58, 5, 3, 4, 3, 5]
    groups = split_by_length(lengths, run_cost_tokens=32)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[3, 3, 3, 3, 4, 4, 5, 5], [58, 60]]


def test_similar_lengths_stay_one_run() -> None:
    from modelpack.serving.padding import split_by_length

    assert split_by_length([10, 12, 11, 9], run_cost_tokens=32) == [[3, 0, 2, 1]]
