"""See DESIGN.md."""

from __future__ import annotations
