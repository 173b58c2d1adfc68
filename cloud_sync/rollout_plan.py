"""Planning and running a rollout end to end: what ``edgebento rollout`` does, as a library.

Import path and API::

    from cloud_sync.rollout_plan import RolloutRequest, execute, exit_code
    state = execute(RolloutRequest(store=..., broker=..., name="det", version=2,
                                   devices=["a", "b"], key=Path("signing.key")))
    code = exit_code(state, wait_all=False)

Planning: the targets are the devices named, or the members of the group in the store
(``cloud_sync.groups``); the version must be published (``Registry.entry``, which checks the
signed manifest); each device's previous version is what its status says. Resuming loads the
saved state, turns a ``completed``, ``timed_out`` or ``unverified`` rollout back to ``running``
(to catch devices that were offline, or judge a wave again) and finishes an ``aborting`` one.
One controller per fleet at a time: ``execute`` holds the fleet's lease (``cloud_sync.lease``)
from before the first publish to the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.broker_url import check_broker_port
from cloud_sync.lease import DEFAULT_TTL_S, Lease
from cloud_sync.protocol import Topics
from cloud_sync.rollout import Rollout
from cloud_sync.rollout_record import SaveRecord
from cloud_sync.rollout_state import RolloutState, Thresholds, check_device_ids, new_rollout
from cloud_sync.rollout_store import load_state, save_state
from cloud_sync.sealed import public_of
from cloud_sync.store import ObjectStore, open_store
from cloud_sync.watch import FleetWatch
from modelpack.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelpack.signing import TrustedKey

QUIET_S = 0.3  # retained documents arrive in one burst after the subscription
QUIET_MAX_S = 5.0
MIN_LEASE_TTL_S = 1.0


@dataclass(frozen=True)
class RolloutRequest:
    store: str
    broker: str
    key: Path  # signs the rollback instructions of an abort
    name: str | None = None
    version: int | None = None
    resume: str | None = None
    devices: tuple[str, ...] = ()
    group: str | None = None
    prefix: str = "edgebento"
    endpoint_url: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    timeout_s: float | None = None
    wait_all: bool = False
    allow_unverified: bool = False  # also on resume: go on past a wave that cannot be judged
    lease_ttl_s: float = DEFAULT_TTL_S
    save_every_s: float = 1.0
    state_dir: Path | None = None  # the record of each rollout's last save (rollout_record)

    def __post_init__(self) -> None:
        # A lease of 0 s is expired the moment it is taken: a second controller would take it
        # over while the first still publishes.
        if not self.lease_ttl_s >= MIN_LEASE_TTL_S:
            raise ConfigError(
                f"--lease-ttl must be at least {MIN_LEASE_TTL_S:g}s, not {self.lease_ttl_s:g}"
            )
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be positive, not {self.timeout_s:g}")
        if self.resume is None:
            check_time(self.timeout_s, self.thresholds)
        check_broker_port(self.broker, "--broker")
        check_device_ids(list(self.devices))  # before any connection: "+" would be a wildcard
        if not self.save_every_s >= 0:
            raise ConfigError(f"the save interval must not be negative ({self.save_every_s:g})")


def check_time(timeout_s: float | None, thresholds: Thresholds) -> None:
    """A run whose --timeout cannot hold one wave (its wave timeout and bake) would stop as
    ``timed_out`` at once, having pushed nothing: refused before anything connects."""
    need = thresholds.wave_timeout_s + thresholds.bake_s
    if timeout_s is not None and timeout_s < need:
        raise ConfigError(
            f"--timeout {timeout_s:g}: judging one wave takes --wave-timeout "
            f"{thresholds.wave_timeout_s:g} + --bake {thresholds.bake_s:g} = {need:g}s; give "
            "a longer --timeout or a shorter --wave-timeout"
        )


def wait_quiet(watch: FleetWatch, quiet_s: float = QUIET_S, max_s: float = QUIET_MAX_S) -> None:
    """Until no status or desired state came for ``quiet_s`` (the retained burst is over), at
    most ``max_s``; telemetry, which never stops, does not count."""
    deadline = time.monotonic() + max_s
    seen = -1
    while time.monotonic() < deadline and seen != watch.documents:
        seen = watch.documents
        time.sleep(quiet_s)


def resolve_targets(
    store: ObjectStore, devices: tuple[str, ...], group: str | None, trusted: TrustedKey
) -> list[str]:
    """The devices named, or the members of ``group`` in the cloud's registry of groups
    (``cloud_sync.groups``), signed by the controller's key: never what a device says of
    itself in its status, nor what a bucket writer put there."""
    from cloud_sync.groups import group_members

    if bool(devices) == bool(group):
        raise ConfigError("give either --devices a,b,c or --group G")
    if devices or group is None:
        return list(dict.fromkeys(devices))
    members = group_members(store, group, trusted)
    if not members:
        raise ConfigError(
            f"group {group!r} has no devices in {store.url}: add them with "
            f"edgebento fleet group add {group} DEVICE... --key KEY"
        )
    return members


def start_rollout(
    store: ObjectStore,
    watch: FleetWatch,
    name: str,
    version: int,
    devices: list[str],
    thresholds: Thresholds,
    signer: Ed25519PrivateKey,
    record: SaveRecord | None = None,
) -> RolloutState:
    """Plan the waves from what each device runs now (so far as heard), and save the plan."""
    from cloud_sync.registry import Registry

    Registry(store).entry(name, version)  # refuse a version that is not published, or forged
    previous = {}
    for device in devices:
        status = watch.statuses.get(device)
        previous[device] = status.model if status is not None and status.model else None
    seen = [d.generation for d in watch.desired.values()]
    generation = max(seen, default=0) + 1  # above any desired state the devices were given
    state = new_rollout(
        name, version, devices, previous, thresholds, watch.topics.prefix, generation, record
    )
    save_state(store, state, signer)
    return state


def superseded_by(state: RolloutState, watch: FleetWatch) -> str | None:
    """Another rollout that told this one's devices something since (its id), or None.

    Resuming a rollout after a newer one would push its older version again: the devices refuse
    it as a downgrade, the refusals abort it, and the abort's signed rollbacks take the fleet
    back past both rollouts.
    """
    for progress in state.devices:
        desired = watch.desired.get(progress.device)
        if (
            desired is not None
            and desired.rollout != state.id
            and desired.generation >= state.generation
        ):
            return desired.rollout or f"generation {desired.generation}"
    return None


def prepare_resume(state: RolloutState, watch: FleetWatch) -> RolloutState:
    newer = superseded_by(state, watch)
    if newer is not None and state.phase != "aborted":
        raise ConfigError(
            f"rollout {state.id} ({state.name} v{state.version}) was superseded by {newer}, which"
            " has since set the desired state of its devices; resuming would undo it"
        )
    if state.phase in ("completed", "timed_out", "unverified"):
        state.phase = "running"  # check again on devices that were offline or not yet pushed
    return state


EXIT_UNVERIFIED = 3  # the rollout stopped at a wave whose health could not be judged


def exit_code(state: RolloutState, wait_all: bool) -> int:
    if state.phase == "unverified":
        return EXIT_UNVERIFIED
    if state.phase != "completed":
        return 1
    return 0 if not wait_all or state.count("done") == len(state.devices) else 1


def execute(
    request: RolloutRequest,
    on_start: Callable[[RolloutState], None] | None = None,
    on_progress: Callable[[RolloutState], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> RolloutState:
    from modelpack.signing import load_private_key

    signer = load_private_key(request.key)  # fail before anything is published
    store = open_store(request.store, endpoint_url=request.endpoint_url)
    # Resumed only from what this key signed: a bucket writer's edits would otherwise choose
    # what the operator's key signs next (an abort's rollbacks); and not from an older state
    # than this machine's record of the rollout's saves (a whole signed state put back).
    record = SaveRecord.in_dir(request.state_dir)
    prior = load_state(store, request.resume, public_of(signer), record) if request.resume else None
    if prior is not None:
        check_time(request.timeout_s, prior.thresholds)  # the saved thresholds hold on resume
    prefix = prior.prefix if prior else request.prefix
    wanted = {d.device for d in prior.devices} if prior else set(request.devices) or None
    with FleetWatch(request.broker, Topics(prefix), wanted).start(settle_s=0) as watch:
        wait_quiet(watch)
        # A resume may follow a controller killed with -9, whose lease runs out by itself.
        lease = Lease.acquire(
            store,
            prefix,
            prior.id if prior else "planning",
            ttl_s=request.lease_ttl_s,
            wait_s=request.lease_ttl_s * 1.5 if prior else 0.0,
        )
        try:
            if prior is not None:
                state = prepare_resume(prior, watch)
                if request.allow_unverified:
                    state.thresholds.allow_unverified = True
                lease.renew(force=True)
                save_state(store, state, signer)  # conditional: fails if another wrote since
            else:
                if request.name is None or request.version is None:
                    raise ConfigError("a new rollout needs NAME and VERSION")
                targets = resolve_targets(store, request.devices, request.group, public_of(signer))
                watch.devices = set(targets)
                state = start_rollout(
                    store,
                    watch,
                    request.name,
                    request.version,
                    targets,
                    request.thresholds,
                    signer,
                    record,
                )
                lease.doc.rollout = state.id
                lease.renew(force=True)
            if on_start is not None:
                on_start(state)
            return Rollout(
                store,
                watch,
                state,
                signer=signer,
                timeout_s=request.timeout_s,
                wait_all=request.wait_all,
                save_every_s=request.save_every_s,
                lease=lease,
                on_progress=on_progress,
                say=say,
            ).run()
        finally:
            lease.release()
