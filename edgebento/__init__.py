"""edgebento: one signed ONNX ModelPack, served in the cloud, serverless and on edge devices.

This package is composition only: the CLI and the demo. The work lives in ``modelpack``,
``optimize``, ``bentos``, ``cloud_sync`` and ``edge_agent``.
"""

from __future__ import annotations

__version__ = "0.1.0"
