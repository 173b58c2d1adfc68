"""Cloud targets of a ModelPack: the BentoML service, the Lambda handler, deployment files.

- ``store``: packs in the BentoML model store (``import_pack``), re-verified when served
- ``service``: the ``@bentoml.service`` (``bentoml serve bentos.service:EdgebentoService``), an adapter
  over the serving core (``modelpack.serving``: parsing, validation, batching, overload)
- ``lambda_handler`` / ``lambda_events``: ``handler(event, context)`` and the event shapes
- ``deploy_k8s`` / ``deploy_lambda``: Kubernetes, KEDA, BentoCloud and SAM files
- ``container``: buildah, podman and a Debian base image for ``bentoml containerize``

Nothing is imported here: BentoML, boto3 and ONNX Runtime load only where they are used.
"""

from __future__ import annotations
