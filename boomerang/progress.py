"""How progress reads, the same in the CLI, `boomerang jobs` and the dashboard."""

from __future__ import annotations


def format_eta(seconds, missing: str = "-") -> str:
    """Seconds as M:SS or H:MM:SS, for progress displays."""
    if seconds is None:
        return missing
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
