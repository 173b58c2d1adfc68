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


def test_linger_ends_once_a_scrape_that_began_after_the_last_update_has_been_answered() -> None:
    """A short rollout ends between two scrapes: the controller serves its last phase until a
    scrape begun after it was answered (the next scrape begins), and not longer."""
    import threading

    import httpx

    from edgebento.localservices import LOOPBACK, free_port

    state = new_rollout("m", 2, ["a"], {}, Thresholds(), "p")
    metrics = RolloutMetrics()
    port = free_port()
    metrics.serve(port, addr=LOOPBACK)
    state.phase = "aborted"
    metrics.update(state)
    assert metrics.linger(0.05) is False  # nobody scraped: it gives up at its bound
    done: list[bool] = []
    lingering = threading.Thread(target=lambda: done.append(metrics.linger(600)))
    lingering.start()
    first = httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=30).text
    assert f'edgebento_rollout_phase{{phase="aborted",rollout="{state.id}"}} 1.0' in first
    lingering.join(timeout=0.2)
    assert lingering.is_alive()  # one scrape begun, maybe not yet answered: it serves on
    httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=30)
    lingering.join(timeout=60)
    assert done == [True]
