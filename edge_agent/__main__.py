"""``python -m edge_agent run ...``: the same as the ``edge-agent`` console script."""

from __future__ import annotations

import sys

from edge_agent.cli import main

sys.exit(main())
