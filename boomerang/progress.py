"""How progress reads, the same in the CLI, `boomerang jobs` and the dashboard; phases of long work."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass


def format_eta(seconds, missing: str = "-") -> str:
    """A duration that cannot be read as a clock time: 45s, 18m34s, 2h05m."""
    if seconds is None:
        return missing
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Phase:
    """Where a long job is before (or after) its training steps: a named phase, n of N, its rate and ETA."""

    name: str
    """e.g. "writing the teacher's corpus"."""
    done: int
    total: int
    unit: str
    """What is counted: "documents", "layers", ..."""
    elapsed_s: float

    @property
    def rate(self) -> float | None:
        return self.done / self.elapsed_s if self.done and self.elapsed_s > 0 else None

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate else None

    def text(self) -> str:
        rate = f" · {self.rate:.2f} {self.unit}/s" if self.rate else ""
        return f"{self.name}: {self.done}/{self.total} {self.unit}{rate} · ETA {format_eta(self.eta_s)}"


class Phases:
    """Reports phases to a callback (or nowhere): `with phases.run(name, total, unit) as step: ... step()`."""

    def __init__(self, on_phase: Callable[[Phase], None] | None = None):
        self.on_phase = on_phase

    @contextmanager
    def run(self, name: str, total: int, unit: str):
        start = time.perf_counter()
        count = {"done": 0}

        def report() -> None:
            if self.on_phase:
                self.on_phase(Phase(name, count["done"], total, unit, time.perf_counter() - start))

        def step(n: int = 1) -> None:
            count["done"] += n
            report()

        report()
        yield step
