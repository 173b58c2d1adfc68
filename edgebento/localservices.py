"""Mosquitto and Prometheus of our own on free loopback ports, for the demo and the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebento.localports import (
    LOOPBACK,
    PortTaken,
    free_port,
    listens,
    wait_for_port,
    wait_serving,
)

__all__ = [
    "ACL_TEMPLATE",
    "LOOPBACK",
    "OBSERVABILITY",
    "Mosquitto",
    "PortTaken",
    "Prometheus",
    "fleet_acl",
    "free_port",  # the port helpers (edgebento.localports), as the tests and demos import them
    "listens",
    "mosquitto_binary",
    "prometheus_binary",
    "running_mosquitto",
    "wait_for_port",
    "wait_serving",
]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        raise RuntimeError(
            "mosquitto is not installed: run 'make demo' or 'make test', which install it"
        )
    return found


ACL_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl"


def fleet_acl(prefix: str) -> str:
    """deploy/mosquitto/acl for topic prefix ``prefix`` (the file is written for the default)."""
    lines = ACL_TEMPLATE.read_text().splitlines()
    out = [ln if ln.startswith("#") else ln.replace(" edgebento/", f" {prefix}/") for ln in lines]
    return "\n".join(out) + "\n"


@dataclass
class Mosquitto:
    """A Mosquitto broker of its own, on a free loopback port, that can be killed and restarted.

    With ``users`` (name -> password) it refuses anonymous clients and enforces the ACL of
    ``deploy/mosquitto/acl`` for ``prefix``: each device (user name = device id) publishes only
    its own status, telemetry and replies, and ``sync``, ``controller`` and ``operator`` are the
    cloud's identities.
    """

    workdir: Path
    users: dict[str, str] | None = None
    prefix: str = "edgebento"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # Off, a kill -9 loses every retained message and queued session: the harsh setting.
    persistence: bool = True
    # mTLS (cloud_sync.broker_config): clients need a certificate of the fleet CA, their CN is
    # their user name, and the ACL is deploy/mosquitto/acl plus the enrollment identities.
    tls: Any = None
    claim_port: int = field(default_factory=free_port)  # with tls: enrollment by claim
    _served: bool = field(default=False, init=False, repr=False)  # started once: ports kept

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{LOOPBACK}:{self.port}"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            from cloud_sync.broker_config import tls_listeners

            base = fleet_acl(self.prefix)
            listener = tls_listeners(
                self.port, self.claim_port, LOOPBACK, self.tls, self.workdir, base, self.prefix
            )
        else:
            listener = [f"listener {self.port} {LOOPBACK}"]
        lines = [
            *listener,
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            # Nagle's algorithm holds a PUBACK-then-PUBLISH pair for a delayed ACK: 40 ms a hop.
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto drops to user "mosquitto", who cannot read pytest's private dirs.
            lines.append("user root")
        if self.tls is not None:
            pass  # each listener has its own ACL and refuses anonymous clients
        elif self.users is None:
            lines.append("allow_anonymous true")
        else:
            passwd = self.workdir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            passwd.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
            acl = self.workdir / "acl"
            acl.write_text(fleet_acl(self.prefix))
            lines += ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        """Start it and wait until it listens. On its first start a port another process took
        since ``free_port`` picked it is replaced by a new one; later starts (a restart after a
        kill) keep the port its clients know."""
        log = self.workdir / "mosquitto.log"
        for _ in range(5):
            conf = self._write_config()
            seen = log.stat().st_size if log.exists() else 0
            self.process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=log.open("ab"),
            )
            ports = [self.port, self.claim_port] if self.tls is not None else [self.port]
            try:
                wait_serving(self.process, ports)
            except (RuntimeError, TimeoutError) as exc:
                said = log.read_bytes()[seen:].decode(errors="replace")
                self.stop()
                taken = isinstance(exc, PortTaken) or "Address already in use" in said
                if not taken or self._served:
                    raise RuntimeError(f"mosquitto did not start: {exc}\n{said[-2000:]}") from exc
                self.port, self.claim_port = free_port(), free_port()
                while self.claim_port == self.port:  # picked again once the first was closed
                    self.claim_port = free_port()
                continue
            self._served = True
            return self
        raise PortTaken(f"mosquitto found its ports taken 5 times; the last: {ports}")

    @property
    def claim_url(self) -> str:
        return f"mqtts://{LOOPBACK}:{self.claim_port}"

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration, ACL and CRL."""
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """kill -9: no clean shutdown, no last save."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_mosquitto(workdir: Path, users: dict[str, str] | None = None) -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir=workdir, users=users).start()
    try:
        yield broker
    finally:
        broker.stop()


OBSERVABILITY = Path(__file__).resolve().parent.parent / "deploy" / "observability"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise RuntimeError(
            "prometheus is not installed: run 'make demo' or 'make test', which install it"
        )
    return found


@dataclass
class Prometheus:
    """Debian's Prometheus on a free loopback port, with the rules of deploy/observability.

    ``targets`` maps a job name to its ``(host:port, labels)`` targets. Scrapes and rule
    evaluations run every ``interval`` so that a short run already has data to show.
    """

    workdir: Path
    targets: dict[str, list[tuple[str, dict[str, str]]]]
    rules: Path = OBSERVABILITY / "rules" / "edgebento.rules.yml"
    interval: str = "1s"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _write_config(self) -> Path:
        import json

        self.workdir.mkdir(parents=True, exist_ok=True)
        jobs = [
            {
                "job_name": job,
                "static_configs": [{"targets": [t], "labels": labels} for t, labels in targets],
            }
            for job, targets in self.targets.items()
        ]
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(self.rules)],
            "scrape_configs": jobs,
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    def start(self) -> Prometheus:
        """Start it and wait until it listens; a port another process took since ``free_port``
        picked it is replaced by a new one (as Mosquitto's first start does)."""
        log = self.workdir / "prometheus.log"
        for _ in range(5):
            config = self._write_config()
            seen = log.stat().st_size if log.exists() else 0
            self.process = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{self.port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log.open("ab"),
            )
            try:
                wait_serving(self.process, [self.port], timeout=30)
            except (RuntimeError, TimeoutError) as exc:
                said = log.read_bytes()[seen:].decode(errors="replace")
                self.stop()
                if not isinstance(exc, PortTaken) and "address already in use" not in said:
                    raise RuntimeError(f"prometheus did not start: {exc}\n{said[-2000:]}") from exc
                self.port = free_port()
                continue
            return self
        raise PortTaken(f"prometheus found its port taken 5 times; the last: {self.port}")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; the ``data`` of a successful answer."""
        import json
        import urllib.parse
        import urllib.request

        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            doc = json.loads(response.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (a scalar comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[Any]:
        """A range query, as a dashboard runs it: every series with a sample in the window."""
        data = self.api("query_range", query=expr, start=str(start), end=str(end), step=str(step))
        return list(data["result"])

    def fired(self, since: float) -> set[str]:
        """The alerts that were firing at some point since ``since`` (unix time)."""
        series = self.query_range('ALERTS{alertstate="firing"}', since, time.time())
        return {s["metric"]["alertname"] for s in series}

    def alerts(self) -> dict[str, str]:
        """Every alert rule and its state: ``inactive``, ``pending`` or ``firing``."""
        groups = self.api("rules", type="alert")["groups"]
        return {r["name"]: r["state"] for g in groups for r in g["rules"]}

    def unhealthy_rules(self) -> dict[str, str]:
        groups = self.api("rules")["groups"]
        return {
            r["name"]: r.get("lastError", "")
            for g in groups
            for r in g["rules"]
            if r.get("health") not in ("ok", "unknown")
        }

    def wait_scraped(self, jobs: tuple[str, ...] | None = None, timeout: float = 60.0) -> None:
        """Until every target of ``jobs`` (default all) has been scraped successfully."""
        jobs = tuple(self.targets) if jobs is None else jobs
        expected = sum(len(self.targets[j]) for j in jobs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RuntimeError):
                active = [
                    t for t in self.api("targets")["activeTargets"] if t["labels"]["job"] in jobs
                ]
                if len(active) >= expected and all(t["health"] == "up" for t in active):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"prometheus did not scrape every target: {self.api('targets')}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
