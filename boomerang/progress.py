"""How progress reads, the same in the CLI, `boomerang jobs` and the dashboard."""

from __future__ import annotations


def format_eta(seconds, missing: str = "-") -> str:
    """A duration that cannot be read as a clock time: 45s, 18m34s, 2h05m."""
    if seconds is None:
        return missing
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
