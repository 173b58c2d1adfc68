"""Which downgrades a device accepts, and the desired state reconciled under that rule.

Following TUF's rollback rule, a device never installs a version at or below the highest it
ever installed for that model name (the mark kept in ``state.json``) unless a signed, unexpired
``RollbackInstruction`` for this device and that exact version says so: in a ``rollback``
command's ``authorization`` or a desired state's ``authorization`` (with ``"rollback": true``).
The instruction is verified with the same trusted keys as packs (``cloud_sync.authority``), must
leave what the device runs, and must carry a generation above every instruction the device
applied; the device records that generation in ``state.json`` before it acts, so an instruction
works once and cannot undo a later install (Uptane). A retained desired state is acted on at
boot only if its generation is above that of the last one the device acted on: what a device
did since (a later deploy) is not undone by an old retained document when it restarts.
The device's own automatic rollback after a failed health check needs no instruction: it never
leaves the old pack.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from typing import Any

from pydantic import ValidationError

from cloud_sync.authority import verify_rollback
from cloud_sync.protocol import (
    Applied,
    Desired,
    ModelRef,
    RollbackCommand,
    RollbackInstruction,
    SignedInstruction,
)
from edge_agent.health import HealthCheckError
from edge_agent.ports import UpdateHost
from modelpack.errors import EdgebentoError, PackError, ProtocolError, SignatureError, first_problem
from modelpack.signing import trusted_keys

log = logging.getLogger(__name__)

NEEDS_AUTHORITY = "a downgrade needs a signed rollback instruction (edgebento rollback signs one)"


def authorize(
    agent: UpdateHost, signed: SignedInstruction | None, model: ModelRef | None
) -> RollbackInstruction:
    """The verified instruction for ``model`` (or the one it names, when ``model`` is None)."""
    if signed is None:
        raise SignatureError(f"refused: {NEEDS_AUTHORITY}")
    if model is None:
        model = _named_model(signed)
    keys = trusted_keys(agent.config.trust)
    updater = agent.updater
    with updater._lock:  # checked and recorded at once: two deliveries cannot both pass
        state = updater.read_state()
        cur = updater.current
        runs = ModelRef(name=cur.manifest.name, version=cur.manifest.version) if cur else None
        instruction = verify_rollback(
            signed,
            keys,
            agent.config.device,
            model,
            applied_generation=state.rollback_generation,
            runs=runs,
        )
        # Spent before it is acted on: a rollback that then fails needs a new instruction.
        try:
            updater._write_state(
                dataclasses.replace(state, rollback_generation=instruction.generation)
            )
        except OSError as exc:
            raise SignatureError(
                f"refused: cannot record the rollback's generation in state.json: {exc}"
            ) from exc
    return instruction


def _named_model(signed: SignedInstruction) -> ModelRef:
    """The model an instruction names, read before its signature is checked (which follows at
    once, over the same bytes, with this model)."""
    try:
        payload = base64.b64decode(signed.payload, validate=True)
        return RollbackInstruction.model_validate_json(payload).model
    except (binascii.Error, ValueError, ValidationError) as exc:
        raise SignatureError("rollback authorization is not a rollback instruction") from exc


def rollback_command(agent: UpdateHost, command: RollbackCommand) -> dict[str, Any]:
    """``rollback``: to the model the signed instruction names (and the command, if it does)."""
    model = None
    if command.name is not None or command.version is not None:
        name = command.name or (
            agent.updater.current.manifest.name if agent.updater.current else None
        )
        if name is None or command.version is None:
            raise ProtocolError('rollback names a model with "name" and "version"')
        model = ModelRef(name=name, version=command.version)
    try:
        instruction = authorize(agent, command.authorization, model)
    except SignatureError as exc:
        agent.updater.refuse(str(exc), "command")
        raise
    agent.updates.cancel(f"rollback {command.id} takes precedence")
    want = instruction.model
    return agent.updater.rollback_to(want.name, want.version, command.url, trigger="command")


class Reconciler:
    """Acts on each retained desired state once, and echoes what it did in ``Status.applied``."""

    def __init__(self, agent: UpdateHost) -> None:
        self.agent = agent
        self._done: bytes | None = None  # the last desired document acted on this boot

    def _stale_at_boot(self, desired: Desired) -> bool:
        """The first desired state of a boot, if it is not newer than the last one acted on."""
        if self._done is not None:
            return False
        acted = self.agent.updater.read_state().desired_generation
        return acted > 0 and desired.generation <= acted

    def _remember(self, desired: Desired) -> None:
        updater = self.agent.updater
        with updater._lock:
            state = updater.read_state()
            if desired.generation > state.desired_generation:
                try:
                    updater._write_state(
                        dataclasses.replace(state, desired_generation=desired.generation)
                    )
                except OSError as exc:  # acted on already; at worst it is looked at again
                    log.warning("cannot record the desired generation: %s", exc)

    def __call__(self, payload: bytes) -> None:
        agent = self.agent
        try:
            desired = Desired.model_validate_json(payload)
        except ValidationError as exc:
            agent.record("event", {"event": "bad_desired", "error": first_problem(exc, "desired")})
            return
        if payload == self._done:
            return  # acted on once already; a new desired document acts again
        stale = self._stale_at_boot(desired)
        self._done = payload
        if stale:
            outcome, reason = self._left_alone(desired)
        else:
            outcome, reason = self._apply(desired)
            if outcome in ("installed", "rolled_back"):
                self._remember(desired)
        agent.updater.applied = Applied(
            generation=desired.generation,
            rollout=desired.rollout,
            model=desired.model,
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
        ).model_dump(mode="json")
        agent.publish_status()

    def _left_alone(self, desired: Desired) -> tuple[str, str | None]:
        """A retained desired state at boot that is not newer than the last one acted on: what
        the device did since (a later deploy) stands."""
        want, cur = desired.model, self.agent.updater.current
        self.agent.record("event", {"event": "desired_not_newer", "generation": desired.generation})
        if cur is not None and (cur.manifest.name, cur.manifest.version) == (
            want.name,
            want.version,
        ):
            return "installed", None
        return "refused", (
            f"desired generation {desired.generation} is not newer than the last desired state "
            "this device acted on; what it installed since stands"
        )

    def _apply(self, desired: Desired) -> tuple[str, str | None]:
        agent, want = self.agent, desired.model
        updater = agent.updater
        cur = updater.current
        if cur is not None and (cur.manifest.name, cur.manifest.version) == (
            want.name,
            want.version,
        ):
            return "installed", None
        mark = updater.highest(want.name)
        try:
            if mark is not None and want.version <= mark:
                if not desired.rollback:
                    # Name what runs: after a rollback to v1, a desired v2 is no downgrade from
                    # what runs, but a return to a version the device left.
                    runs = f"v{cur.manifest.version}" if cur is not None else "no model"
                    message = (
                        f"desired {want.name} v{want.version} is not above v{mark}, the highest "
                        f"this device installed (it runs {runs}), and not marked "
                        '"rollback": true; installing a version at or below that mark needs a '
                        "signed rollback instruction (edgebento rollback signs one)"
                    )
                    updater.refuse(message, "desired", source=f"{want.name} v{want.version}")
                    return "refused", message
                try:
                    authorize(agent, desired.authorization, want)
                except SignatureError as exc:
                    updater.refuse(str(exc), "desired", source=f"{want.name} v{want.version}")
                    return "refused", str(exc)
                result = updater.rollback_to(want.name, want.version, desired.url, "desired")
            elif desired.url:
                result = updater.deploy_url(desired.url, trigger="desired")
            else:
                result = updater.deploy_named(want.name, want.version, trigger="desired")
        except HealthCheckError as exc:
            return "failed", str(exc)
        except PackError as exc:  # signature, version, expiry, layout: refused, not failed
            return "refused", str(exc)
        except EdgebentoError as exc:
            log.error("desired %s v%s not installed: %s", want.name, want.version, exc)
            return "failed", str(exc)
        return ("rolled_back" if result["outcome"] == "rolled_back" else "installed"), None
