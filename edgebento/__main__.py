"""``python -m edgebento``: the same as the ``edgebento`` command."""

from __future__ import annotations

import sys

from edgebento.cli import main

sys.exit(main())
