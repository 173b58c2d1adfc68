"""Rollouts to simulated fleets (``edgebento simulate``) on a real Mosquitto: each finding of
issue 14 about rollouts triggered for real — a controller killed with -9 in the middle of an
abort, statuses that arrive late, one deadline for all waves, two controllers on one fleet —
and the watch's callbacks under hostile messages."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cloud_sync.protocol import Topics
from cloud_sync.rollout_store import load_state
from cloud_sync.watch import FleetWatch
from edgebento.cli import main
from tests.support.fleet import rollout_ids
from tests.support.promtool import assert_promtool_passes
from tests.support.services import Mosquitto, free_port
from tests.support.sim import Simulated, cli_process, versions, wait_for

pytestmark = pytest.mark.slow


def base(sim_store_url: str, broker: Mosquitto, prefix: str, key: Path) -> list[str]:
    return [
        *("--store", sim_store_url, "--broker", broker.url, "--prefix", prefix),
        *("--key", str(key), "--lease-ttl", "3", "--json"),
    ]


def devices(*groups: Simulated) -> str:
    return ",".join(d for g in groups for d in g.names)


# One rollout can publish the rollbacks of an abort, then be killed: the test's controller dies
# by SIGKILL right after the third rollback instruction was acknowledged by the broker.
KILL_AFTER_3_ROLLBACKS = """
import os, signal, sys
from cloud_sync import watch
publish = watch.FleetWatch.set_desired_many
def dying(self, items):
    items = list(items)
    if items and items[0][1] is not None and items[0][1].rollback:
        publish(self, items[:3])
        os.kill(os.getpid(), signal.SIGKILL)
    publish(self, items)
watch.FleetWatch.set_desired_many = dying
from edgebento.cli import main
sys.exit(main())
"""


def test_a_controller_killed_mid_abort_is_resumed_into_finishing_it(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    healthy = simulate(7)
    failing = simulate(3, 7, "--fail-version", "2", "--install-s", "1.5")
    args = base(sim_store_url, broker, topic_prefix, keys[0])
    flags = ["--devices", devices(healthy, failing), "--canary", "100", "--bake", "0"]
    import sys

    dying = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_3_ROLLBACKS, "rollout", "tiny", "2", *args, *flags],
        capture_output=True,
        timeout=120,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr.decode()
    (rollout_id,) = rollout_ids(sim_store_url)
    saved = load_state(__import__("cloud_sync.store").store.open_store(sim_store_url), rollout_id)
    # Written ahead: the decision, its reason and its figures were saved before any rollback.
    assert saved.phase == "aborting" and " of 10 updated devices failed" in (saved.reason or "")
    assert saved.figures is not None and saved.figures.touched == 10 and saved.figures.failed
    # 3 go back (each when it has acted on its rollback), 4 stay on the bad v2.
    everyone, deadline = healthy.names + failing.names, time.monotonic() + 60
    while sorted((fleet := versions(broker, topic_prefix, everyone)).values()) != [1] * 6 + [2] * 4:
        assert time.monotonic() < deadline, fleet
        time.sleep(0.2)

    capsys.readouterr()
    assert main(["rollout", "resume", rollout_id, *args]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "aborted" and shown["reason"] == saved.reason
    assert {d["state"] for d in shown["devices"]} == {"rolled_back"}
    wait_for(broker, topic_prefix, dict.fromkeys(healthy.names + failing.names, 1))
    with FleetWatch(broker.url, Topics(topic_prefix), set(healthy.names + failing.names)) as w:
        # Every retained desired state is the signed way back, also where the update had failed.
        assert {(d.model.version, d.rollback) for d in w.desired.values()} == {(1, True)}
        assert len(w.desired) == 10 and all(d.authorization for d in w.desired.values())


def test_a_device_heard_late_is_rolled_back_to_the_version_it_reported(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    # Two failing devices: one alone in a wave of 5 would be tolerated (it may be lying).
    failing = simulate(2, 10, "--fail-version", "2", "--install-s", "4")
    late = Simulated(broker, topic_prefix, keys[1], tmp_path / "late.log", 4)
    args = base(sim_store_url, broker, topic_prefix, keys[0])
    flags = ["--devices", devices(late, failing), "--canary", "100", "--bake", "0"]
    controller = cli_process("rollout", "tiny", "2", *args, *flags, log=tmp_path / "ctl.log")
    try:
        deadline = time.monotonic() + 30
        while not rollout_ids(sim_store_url):  # planned, with no status of the late four
            assert time.monotonic() < deadline, (tmp_path / "ctl.log").read_text()
            time.sleep(0.1)
        late.start()  # they report v1, take the retained v2, and install it
        out, _ = controller.communicate(timeout=90)
        shown = json.loads(out)
        assert shown["phase"] == "aborted", shown["reason"]
        states = {d["device"]: (d["state"], d["previous"]) for d in shown["devices"]}
        for device in late.names:
            assert states[device] == ("rolled_back", {"name": "tiny", "version": 1})
        wait_for(broker, topic_prefix, dict.fromkeys(late.names, 1))
    finally:
        late.stop()
        if controller.poll() is None:
            controller.kill()
            controller.wait()


def test_a_wave_is_pushed_only_when_there_is_time_to_judge_it(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fleet = simulate(100)
    args = base(sim_store_url, broker, topic_prefix, keys[0])
    flags = ["--devices", devices(fleet), "--waves", "3", "--wave-timeout", "3", "--bake", "2"]
    assert main(["rollout", "tiny", "2", *args, *flags, "--timeout", "8"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "timed_out" and "not pushed" in shown["reason"]
    states = {d["device"]: d["state"] for d in shown["devices"]}
    assert set(states.values()) == {"done", "pending"}, shown["counts"]  # nobody judged failed
    have = versions(broker, topic_prefix, fleet.names)
    assert {d for d, v in have.items() if v == 2} == {d for d, s in states.items() if s == "done"}
    with FleetWatch(broker.url, Topics(topic_prefix), set(fleet.names)) as watch:
        assert not any(d.rollback for d in watch.desired.values())  # no rollback was sent

    assert main(["rollout", "resume", shown["id"], *args, "--wait", "--timeout", "60"]) == 0
    wait_for(broker, topic_prefix, dict.fromkeys(fleet.names, 2))


def test_two_controllers_cannot_run_on_one_fleet(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fleet = simulate(5)
    args = base(sim_store_url, broker, topic_prefix, keys[0])
    flags = ["--devices", devices(fleet), "--bake", "30"]
    port = free_port()
    first = cli_process(
        "rollout", "tiny", "2", *args, *flags, "--metrics-port", str(port),
        log=tmp_path / "first.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not rollout_ids(sim_store_url):
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        (rollout_id,) = rollout_ids(sim_store_url)
        while 'state="done"} 1.0' not in (text := scrape(port)):  # the canary: 1 of 5
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert f'edgebento_rollout_phase{{phase="running",rollout="{rollout_id}"}} 1.0' in text
        assert_promtool_passes(text)
        capsys.readouterr()
        assert main(["rollout", "tiny", "2", *args, *flags]) == 1
        assert "is leased to rollout" in capsys.readouterr().err
        assert len(rollout_ids(sim_store_url)) == 1  # the second planned nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def scrape(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""  # not serving yet


def test_the_watch_survives_hostile_messages_and_trusts_only_the_topic(
    broker: Mosquitto, topic_prefix: str
) -> None:
    import paho.mqtt.client as mqtt

    t = Topics(topic_prefix)
    hostile = [
        (
            t.status("x"),
            b'{"device": "y", "state": "online", "model": {"name": "m", "version": 9}}',
        ),
        (
            t.status("x"),
            b'{"device": "x", "state": "online", "model": {"name": "m", "version": '
            + b"9" * 400
            + b"}}",
        ),
        (t.status("x"), b"\xff\xfe not json"),
        (
            t.telemetry("x"),
            b'{"records": [{"device": "y", "boot_id": "b", "seq": 0, "ts": 1,'
            b' "kind": "inference", "data": {"ok": -1}}]}',
        ),
        (
            t.telemetry("x"),
            b'{"records": [{"device": "x", "boot_id": "b", "seq": 0, "ts": 1,'
            b' "kind": "inference", "data": {"ok": -1, "errors": "many", "p99_ms": 1e400}}]}',
        ),
        (t.desired("x"), b'{"model": {"name": "m", "version": "two"}}'),
    ]
    good = b'{"device": "x", "state": "online", "model": {"name": "m", "version": 1}}'
    with FleetWatch(broker.url, t, None).start(settle_s=0) as watch:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        for topic, payload in [*hostile, (t.status("x"), good)]:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while "x" not in watch.statuses and time.monotonic() < deadline:
            watch.wait(0.2)
        client.loop_stop()
        client.disconnect()
        assert watch.statuses["x"].model.version == 1  # type: ignore[union-attr]
        assert "y" not in watch.statuses and "y" not in watch.view.snapshot()
        assert watch.rejected["identity"] == 2
        assert watch.rejected["schema"] >= 2  # not JSON, and a version that is not a number
        assert watch.client.client.is_connected()  # paho's network thread lived through it


def test_simulated_devices_come_back_after_the_broker_is_killed(
    own_broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    sim = Simulated(own_broker, topic_prefix, keys[1], tmp_path / "sim.log", 20).start()
    try:
        # A device may be back before the watch connects: its status counts if it is newer than
        # the kill (the retained one the broker restored from before it is not).
        killed = time.time()
        own_broker.kill()  # kill -9
        own_broker.start()  # same port
        with FleetWatch(own_broker.url, Topics(topic_prefix), set(sim.names)) as watch:
            deadline = time.monotonic() + 30
            while True:
                watch.take_changed()  # so that wait() sleeps until the next status, not spins
                online = {d for d, s in list(watch.statuses.items()) if s.state == "online"}
                if online == set(sim.names) and all(watch.statuses[d].ts > killed for d in online):
                    break
                assert time.monotonic() < deadline, f"{len(online)} of 20 back"
                watch.wait(0.5)
    finally:
        sim.stop()


def test_a_status_the_dead_broker_never_acknowledged_is_not_what_the_new_one_retains(
    own_broker: Mosquitto, topic_prefix: str
) -> None:
    """The race behind "20 of 20 back": a device's status published just before the broker died
    is unacknowledged, and paho resends it on reconnect, after the on_connect callback. The
    status published inside the callback went first, so the broker retained the stale one, and
    the device, which reports on connect only, never corrected it."""
    import paho.mqtt.client as mqtt

    from cloud_sync.protocol import ModelRef, Status
    from cloud_sync.sim_fleet import SimFleet

    topics = Topics(topic_prefix)
    fleet = SimFleet(own_broker.url, ["sim-0"], ModelRef(name="tiny", version=1), topics=topics)
    fleet.connect()
    try:
        assert own_broker.process is not None
        own_broker.process.send_signal(signal.SIGSTOP)  # it reads nothing and acknowledges nothing
        fleet.sims["sim-0"].on_connect()  # a status it will never acknowledge
        fleet.step(0.0)
        stale = time.time()
        own_broker.kill()  # kill -9
        own_broker.start()  # same port, with the retained statuses it had saved
        deadline = time.monotonic() + 30
        for lost in (True, False):  # it notices the kill, then it is back
            while ("sim-0" in fleet.connected) is lost:
                assert time.monotonic() < deadline, f"lost: {lost}"
                fleet.step(0.1)
        fleet.step(0.0)  # what its reconnect scheduled
        # A marker after both statuses: once it is acknowledged, the broker has handled them.
        marker = fleet.clients["sim-0"].publish(f"{topic_prefix}/marker", b"", qos=1)
        while not marker.is_published():
            assert time.monotonic() < deadline, "the marker was not acknowledged"
            fleet.step(0.1)
        reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        got: list[bytes] = []
        reader.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
        reader.connect("127.0.0.1", own_broker.port)
        reader.subscribe(topics.status("sim-0"), qos=1)
        reader.loop_start()
        try:
            while not got:
                assert time.monotonic() < deadline, "no retained status"
                time.sleep(0.05)
        finally:
            reader.loop_stop()
            reader.disconnect()
        retained = Status.model_validate_json(got[0])
        assert retained.state == "online" and retained.ts > stale, retained.ts - stale
    finally:
        fleet.close()
