"""Where the project keeps its data, and how its small records there are written (a module of its own: `models`,
`precision` and `training.timing` all need it)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def boomerang_home() -> Path:
    """The project's data folder: `$BOOMERANG_HOME`, default `~/.boomerang`."""
    return Path(os.environ.get("BOOMERANG_HOME", "~/.boomerang")).expanduser()


def write_record(path: Path, data: dict) -> bool:
    """Write a small JSON record atomically (a reader never sees half of it); False when the folder is read-only:
    a record lost is measured again, never a failed run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError:
        return False
    return True
