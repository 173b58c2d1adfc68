"""Mosquitto's configuration for a fleet whose devices authenticate with certificates.

Import path and API::

    from cloud_sync.broker_config import BrokerTls, mosquitto_conf, tls_listeners
    tls = BrokerTls(cafile, certfile, keyfile, crlfile)
    lines = tls_listeners(port, claim_port, host, tls, acl_dir, base_acl, prefix)
    # writes acl_dir/acl (the device listener's ACL) and acl_dir/claim.acl (the claim one's)

Each listener has an ACL of its own (``per_listener_settings true``). The device listener's
is the one of ``deploy/mosquitto/acl`` (a device's user name is the CN of its certificate,
``use_identity_as_username``), never a fork of it: the identity rights are appended, and the
claim certificate gets nothing there (its ``pattern`` rights as a device called ``claim``
included). The claim listener's grants the claim certificate the enrollment topics and
nobody anything else. ``use_username_as_clientid`` makes the client id the CN as well, so that
no client can take over another device's session by connecting with its client id (Mosquitto
drops the older of two connections with one client id), and so that ``edgebento fleet revoke``
can drop a revoked device's live session, which a CRL reload alone does not do
(docs/fleet-identity.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BrokerTls:
    cafile: Path  # root + issuing intermediate
    certfile: Path  # the broker's server certificate
    keyfile: Path
    crlfile: Path  # rewritten by revocations; re-read on SIGHUP


def identity_acl(base: str, prefix: str = "edgebento") -> str:
    """The device listener's ACL: ``base`` (deploy/mosquitto/acl for ``prefix``) plus renewal."""
    p = prefix
    extra = f"""
# --- identity (edgebento fleet broker-config; docs/fleet-identity.md) ------------------------
# The enrollment service, `edgebento fleet enroll-service`: reads requests, answers them, and
# reads statuses (a revoked device still online is an alert).
user enroll
topic read {p}/enroll/+/claim
topic read {p}/enroll/+/renew
topic read {p}/enroll/+/rotated
topic write {p}/enroll/+/response
topic read {p}/+/status

# A device renews over its current certificate, for itself only.
pattern write {p}/enroll/%u/renew
pattern write {p}/enroll/%u/rotated
pattern read {p}/enroll/%u/response

# The shared claim certificate is valid here too (one CA), and the patterns above apply to
# every user: a "deny" is checked before any grant, patterns included, so it gets nothing.
user claim
topic deny #
"""
    return base.rstrip("\n") + "\n" + extra


def claim_acl(prefix: str = "edgebento") -> str:
    """The claim listener's ACL: the shared claim certificate may ask and read answers; nobody
    else (a device's certificate, a cloud identity's) has any right there: no pattern."""
    return (
        "# The claim listener (edgebento fleet broker-config): enrollment by claim only.\n"
        "user claim\n"
        f"topic write {prefix}/enroll/+/claim\n"
        f"topic read {prefix}/enroll/+/response\n"
    )


def _tls(tls: BrokerTls) -> list[str]:
    return [
        f"cafile {tls.cafile}",
        f"certfile {tls.certfile}",
        f"keyfile {tls.keyfile}",
        f"crlfile {tls.crlfile}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
    ]


def tls_listeners(
    port: int,
    claim_port: int,
    host: str | None,
    tls: BrokerTls,
    acl_dir: Path,
    base_acl: str,
    prefix: str = "edgebento",
) -> list[str]:
    """Two listeners sharing the CRL, each with its ACL (written into ``acl_dir``).

    The device listener makes the client id the CN (``use_username_as_clientid``). The claim
    listener serves the one claim certificate that a whole batch of devices shares, so there
    the client id is the client's own (``claim-...``), and many devices enroll at once.
    ``per_listener_settings true``: ``allow_anonymous`` and ``acl_file`` below are each
    listener's own, and a listener without an ``acl_file`` would allow everything, so each
    gets one."""
    acl_dir.mkdir(parents=True, exist_ok=True)
    device_acl, claim_only = acl_dir / "acl", acl_dir / "claim.acl"
    device_acl.write_text(identity_acl(base_acl, prefix))
    claim_only.write_text(claim_acl(prefix))
    at = f" {host}" if host else ""
    return [
        "per_listener_settings true",
        f"listener {port}{at}",
        *_tls(tls),
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"acl_file {device_acl}",
        f"listener {claim_port}{at}",
        *_tls(tls),
        "allow_anonymous false",
        f"acl_file {claim_only}",
    ]


def mosquitto_conf(listeners: list[str], data_dir: Path) -> str:
    """The whole file around ``tls_listeners``'s lines."""
    lines = [
        "# edgebento fleet broker-config: mTLS, the fleet ACL, the CRL (SIGHUP re-reads it)",
        *listeners,
        "persistence true",
        f"persistence_location {data_dir}/",
        # `enroll-service --broker-pid-file` reads it at each CRL change: after a restart the
        # broker has another pid.
        f"pid_file {data_dir}/mosquitto.pid",
        "max_queued_messages 100000",
        "set_tcp_nodelay true",
    ]
    return "\n".join(lines) + "\n"
