"""Where the project keeps its data (a module of its own: `models` and `precision` both need it)."""

from __future__ import annotations

import os
from pathlib import Path


def boomerang_home() -> Path:
    """The project's data folder: `$BOOMERANG_HOME`, default `~/.boomerang`."""
    return Path(os.environ.get("BOOMERANG_HOME", "~/.boomerang")).expanduser()
