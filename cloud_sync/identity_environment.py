"""Which environment a store's identity records belong to, and the fleet CA as its signer.

Import path and API::

    from cloud_sync.identity_environment import EnvironmentCA, checking_ca, environment_of
    ca = EnvironmentCA(FleetCA.load(ca_dir), environment_of(store))  # what IdentityStore holds
    ca = EnvironmentCA(checking_ca(ca_dir), environment_of(store))   # checks, signs nothing
    ca.environment                          # "s3://bucket/prod"

Why: two environments (``s3://fleet/staging`` and ``s3://fleet/prod``, or two buckets) may
share one fleet CA. A device record or CRL index that CA signed in one of them must not pass
in the other: a record copied from staging, where a device of the same id is not revoked, would
undo a revocation in prod. So every record and index is signed for the environment it is
written in (``cloud_sync.identity_records``) and refused as ``misplaced`` elsewhere.

The environment is the store's location as the operator names it to every command
(``--store``): ``s3://bucket/prefix`` (slashes at either end of the prefix dropped) or the
``file://`` URI of a local directory, resolved. Credentials and the endpoint are not part of it
(``S3Store.url`` holds neither), so the same bucket reached through another endpoint host or
with other credentials is the same environment. It needs no setting of its own that one host
could forget or two environments could share by mistake; the price is that a store moved to
another bucket, prefix or directory is another environment (docs/fleet-identity.md says what
to do then).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.fleet_ca import FleetCA, ca_paths, load_cert
from modelpack.errors import ConfigError, KeyFileError

if TYPE_CHECKING:
    from cloud_sync.object_store import ObjectStore


def environment_of(store: ObjectStore) -> str:
    """The environment whose records ``store`` holds: its URL, without endpoint or
    credentials."""
    return store.url


class EnvironmentCA(FleetCA):
    """The fleet CA as the signer of one environment's identity records: what it signs or
    checks with ``cloud_sync.identity_records`` is bound to ``environment``. Claims and
    certificates are signed as by the CA itself."""

    def __init__(self, ca: FleetCA, environment: str) -> None:
        super().__init__(ca.paths, ca.key, ca.cert)
        self.environment = environment

    def sign_record(self, data: bytes) -> str:
        if self.key is None:
            raise ConfigError(
                "records are signed with the issuing key: --ca DIR with issuing/ca.key"
            )
        return super().sign_record(data)


def checking_ca(ca_dir: Path) -> FleetCA:
    """The fleet CA of ``ca_dir`` from its issuing certificate alone: it checks records and
    signs nothing (``fleet status --ca``, which an operator without the key may run)."""
    paths = ca_paths(ca_dir)
    try:
        cert = load_cert(paths.issuing_cert.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"no fleet CA in {ca_dir}: {exc.strerror or exc}") from exc
    except ConfigError as exc:
        raise KeyFileError(f"{paths.issuing_cert} cannot be read: {exc}") from exc
    return FleetCA(paths, None, cert)
