"""Signed rollback instructions: the only authority a device accepts for a downgrade.

A ``RollbackInstruction`` says which device may leave which version (``leaves``) for which
(``model``), at which ``generation``, until when, with a random ``nonce``. It is signed with the
same ed25519 keys as packs, over its exact JSON bytes, and travels as a ``SignedInstruction`` in
a ``rollback`` command or in ``Desired.authorization``. The device verifies the signature before
it parses the payload, then checks device, model, expiry, that it runs what the instruction
leaves, and that the generation is above every instruction it applied (TUF/Uptane: an
instruction works once, and cannot undo a later install). The generation is on the scale of
``Desired.generation``: a rollout's abort uses its rollback generation, ``edgebento rollback``
one above the device's retained desired state.

``DEFAULT_EXPIRES_IN_S`` is what an abort needs: the controller waits ``--rollback-wait`` (60 s)
for devices to go back, and a device that was rebooting or briefly offline picks the retained
instruction up when it reconnects; an hour covers both. Replays are stopped by the generation,
not the expiry; the expiry bounds how long a captured instruction a device has not yet applied
(one for a device that stays offline) can still be delivered.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pydantic import ValidationError

from cloud_sync.protocol import ModelRef, RollbackInstruction, SignedInstruction
from modelpack.errors import SignatureError, first_problem
from modelpack.signing import TrustedKey, sign, verify

if TYPE_CHECKING:  # a device verifies; only the controller signs and needs the key type
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_EXPIRES_IN_S = 3600.0


def sign_rollback(
    private: Ed25519PrivateKey,
    device: str,
    model: ModelRef,
    *,
    generation: int,
    leaves: ModelRef | None,
    rollout: str | None = None,
    expires_in_s: float = DEFAULT_EXPIRES_IN_S,
    now: float | None = None,
) -> SignedInstruction:
    issued = time.time() if now is None else now
    instruction = RollbackInstruction(
        device=device,
        model=ModelRef(name=model.name, version=model.version),
        leaves=ModelRef(name=leaves.name, version=leaves.version) if leaves else None,
        rollout=rollout,
        generation=generation,
        nonce=secrets.token_hex(16),
        issued_at=issued,
        expires_at=issued + expires_in_s,
    )
    payload = instruction.model_dump_json().encode()
    return SignedInstruction(
        payload=base64.b64encode(payload).decode(),
        signature=base64.b64encode(sign(payload, private)).decode(),
    )


def verify_rollback(
    signed: SignedInstruction,
    trusted: Iterable[TrustedKey],
    device: str,
    model: ModelRef,
    now: float | None = None,
    *,
    applied_generation: int,
    runs: ModelRef | None,
) -> RollbackInstruction:
    """The instruction, if a trusted key signed it for this device and model, it is unexpired,
    it leaves what the device ``runs`` (an instruction that names nothing it leaves only for a
    device that runs nothing) and its generation is above ``applied_generation`` (the highest
    the device applied).

    Raises SignatureError with a one-line reason otherwise.
    """
    try:
        payload = base64.b64decode(signed.payload, validate=True)
        signature = base64.b64decode(signed.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("rollback authorization is not valid base64") from exc
    try:
        verify(payload, signature, trusted)
    except SignatureError as exc:
        # signing.verify speaks of manifests; this is an instruction.
        raise SignatureError(
            "rollback authorization is not signed by any trusted key (or was changed after)"
        ) from exc
    try:
        instruction = RollbackInstruction.model_validate_json(payload)
    except ValidationError as exc:
        raise SignatureError(
            f"rollback authorization: {first_problem(exc, 'instruction')}"
        ) from exc
    if instruction.device != device:
        raise SignatureError(
            f"rollback authorization is for device {instruction.device!r}, not {device!r}"
        )
    if (instruction.model.name, instruction.model.version) != (model.name, model.version):
        raise SignatureError(
            f"rollback authorization is for {instruction.model.name} "
            f"v{instruction.model.version}, not {model.name} v{model.version}"
        )
    if instruction.expires_at < (time.time() if now is None else now):
        raise SignatureError("rollback authorization has expired")
    if instruction.generation <= applied_generation:
        raise SignatureError(
            f"rollback authorization of generation {instruction.generation} is not newer than "
            f"generation {applied_generation}, the last this device applied: an instruction "
            "works once"
        )
    leaves = instruction.leaves
    if leaves is None:
        # Unbound, it would leave whatever the device runs when it arrives: one signed for a
        # device that ran nothing (or whose status was unknown) would undo any later install.
        if runs is not None:
            raise SignatureError(
                f"rollback authorization names no version it leaves, and this device runs "
                f"{runs.name} v{runs.version}: only an empty device takes an unbound one (sign "
                "it with the version it leaves: edgebento rollback --leaves)"
            )
    elif not (runs is not None and (runs.name, runs.version) == (leaves.name, leaves.version)):
        shown = f"{runs.name} v{runs.version}" if runs is not None else "no model"
        raise SignatureError(
            f"rollback authorization leaves {leaves.name} v{leaves.version}, but this device "
            f"runs {shown}: it was signed before a later install"
        )
    return instruction
