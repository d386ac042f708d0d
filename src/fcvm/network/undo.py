"""Undo handlers for network resources (filled in by the network layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HANDLERS: dict[str, Callable[[dict[str, Any]], None]] = {}
