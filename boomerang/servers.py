"""Which `boomerang serve` processes run on this machine, for the dashboard to point at.

Each server writes BOOMERANG_HOME/servers/<pid>.json while it runs (its base URL, family name, student
folder and sizes) and removes it when it stops; an entry whose process is gone is ignored and removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from boomerang.models import boomerang_home


def _folder() -> Path:
    return boomerang_home() / "servers"


def register_server(info: dict) -> Path:
    """Record this process as a server; returns the file to remove when it stops."""
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def running_servers() -> list[dict]:
    """The servers whose process is alive, newest first."""
    out = []
    for path in sorted(_folder().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError):
            continue
        out.append(info)
    return out
