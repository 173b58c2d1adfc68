from __future__ import annotations

from cloud_sync.rollout_metrics import RolloutMetrics
from cloud_sync.rollout_state import Thresholds, new_rollout
from tests.support.promtool import assert_promtool_passes


def test_rollout_metrics_follow_the_phase_and_the_device_counts() -> None:
    state = new_rollout("m", 2, ["a", "b", "c"], {}, Thresholds(), "p")
    metrics = RolloutMetrics()
    metrics.update(state)
    state.move(state.device("a"), "done", "runs v2")
    state.phase = "aborting"
    metrics.update(state)
    text = metrics.render()
    assert f'edgebento_rollout_phase{{phase="aborting",rollout="{state.id}"}} 1.0' in text
    assert f'edgebento_rollout_phase{{phase="running",rollout="{state.id}"}} 0.0' in text
    assert f'edgebento_rollout_devices{{rollout="{state.id}",state="done"}} 1.0' in text
    assert f'edgebento_rollout_devices{{rollout="{state.id}",state="pending"}} 2.0' in text
    assert f'edgebento_rollout_suspect_devices{{rollout="{state.id}"}} 0.0' in text
    state.suspects["b"] = "reported 1000000000000000 inferences on v2 in 3s"
    metrics.update(state)
    text = metrics.render()
    assert f'edgebento_rollout_suspect_devices{{rollout="{state.id}"}} 1.0' in text
    assert_promtool_passes(text)
