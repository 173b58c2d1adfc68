"""The serving core every target shares: ``core.ServingCore`` (parse, validate, run, encode),
``routes`` (its HTTP surface), ``oip`` (the Open Inference Protocol), ``batching`` and ``gate``
(bounded queues with deadlines), ``cache``, ``limits`` and ``reasons`` (status and reason)."""
