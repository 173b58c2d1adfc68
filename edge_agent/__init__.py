"""The edgebento device agent: ``edge-agent run`` (see README, "The edge agent").

Modules, one noun each: ``config`` (TOML, ``EDGEBENTO_*``, flags), ``session`` (the MQTT
connection), ``agent`` (composition and message routing), ``commands``, ``inference`` (the live
Predictor), ``updater`` and ``fetch`` (verified updates and rollback), ``outbox`` and
``telemetry`` (durable at-least-once telemetry), ``capture``, ``pipelines``, ``http`` (the
optional local endpoint). Nothing heavy is imported here: a device imports what it uses.
"""

from __future__ import annotations
