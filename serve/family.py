"""The family a server serves: every size by name, built from one copy of the teacher's and student's
weights, and the choice of a size by budget (parameters or prefill latency).

Names: `<family>-<n>L` for every size, `<family>-teacher` and `<family>-student` as aliases, and
`<family>-auto`, which takes `max_params` or `max_latency_ms` and serves the largest size that fits.
Latency comes from the family's own cost measurements (`boomerang eval --cost`, in STUDENT/eval) where
they exist for this machine's device, else it is measured once at start-up and kept in
STUDENT/serve-latency.json for the next start on the same device and thread count.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from boomerang.errors import BoomerangError
from boomerang.generation import prefill_ms
from boomerang.student import StudentFamily

LATENCY_FILE = "serve-latency.json"


@dataclass(frozen=True)
class ServedSize:
    name: str
    n_layers: int
    params: int
    kind: str
    """teacher | student | interpolated"""


def family_name(folder: Path) -> str:
    """A short, URL-safe name: the run's folder for `.../job-3/student`, else the folder's own name."""
    base = folder.parent.name if folder.name == "student" else folder.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-").lower() or "family"


class ServedFamily:
    def __init__(self, opened: StudentFamily, name: str | None = None):
        self.opened, self.family = opened, opened.family
        self.name = name or family_name(opened.folder)
        self.sizes = {}
        for info in self.family.sizes():
            kind = "teacher" if info.is_teacher else "student" if info.is_student else "interpolated"
            self.sizes[info.n_layers] = ServedSize(f"{self.name}-{info.n_layers}L", info.n_layers, info.params, kind)
        self.latency_ms: dict[int, float] = {}
        self._models: dict[int, torch.nn.Module] = {}
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        return self.opened.teacher.tokenizer

    def build(self, n_layers: int) -> torch.nn.Module:
        """The size's model, built once (shared modules: no weight is copied)."""
        with self._lock:
            if n_layers not in self._models:
                self._models[n_layers] = self.family.build(n_layers)
            return self._models[n_layers]

    def aliases(self) -> dict[str, int]:
        counts = sorted(self.sizes)
        return {f"{self.name}-teacher": counts[-1], f"{self.name}-student": counts[0]}

    def resolve(self, model: str, *, max_params=None, max_latency_ms=None) -> int:
        """The layer count a model name means; `auto` picks the largest size within the budget.

        Raises LookupError for an unknown name, BoomerangError for an unusable budget.
        """
        by_name = {s.name: n for n, s in self.sizes.items()} | self.aliases()
        if model in by_name:
            return by_name[model]
        if model != f"{self.name}-auto":
            raise LookupError(model)
        if max_params is None and max_latency_ms is None:
            raise BoomerangError(f"{model} needs a budget: max_params or max_latency_ms in the request body")
        fits = sorted(self.sizes)
        if max_params is not None:
            fits = [n for n in fits if self.sizes[n].params <= max_params]
        if max_latency_ms is not None:
            fits = [n for n in fits if self.latency_ms.get(n, float("inf")) <= max_latency_ms]
        if not fits:
            smallest = min(self.sizes)
            raise BoomerangError(f"no size fits the budget: the smallest is {self.sizes[smallest].name} with "
                                 f"{self.sizes[smallest].params:,} parameters and "
                                 f"{self.latency_ms.get(smallest, float('nan')):.1f} ms prefill")
        return fits[-1]

    # ------------------------------------------------------------------------- latency

    def measure_latency(self, *, tokens: int = 128) -> str:
        """Fill `latency_ms` for every size; returns where the numbers came from."""
        where = self._device_key(tokens)
        stored = self._from_eval(where) or self._from_file(where)
        if stored and set(stored) >= set(self.sizes):
            self.latency_ms = {n: stored[n] for n in self.sizes}
            return "stored"

        self.latency_ms = {n: prefill_ms(self.build(n), tokens=tokens) for n in sorted(self.sizes)}
        path = self.opened.folder / LATENCY_FILE
        try:
            path.write_text(json.dumps({"setting": where, "prefill_ms": self.latency_ms}, indent=2) + "\n")
        except OSError:
            pass  # a read-only student folder: measured again next time
        return "measured"

    def _device_key(self, tokens: int) -> dict:
        device = next(self.family.student.parameters()).device
        return {"device": str(device), "dtype": str(next(self.family.student.parameters()).dtype),
                "threads": torch.get_num_threads(), "prompt_len": tokens}

    def _from_file(self, where: dict) -> dict[int, float] | None:
        path = self.opened.folder / LATENCY_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("setting") != where:
            return None
        return {int(n): float(ms) for n, ms in data.get("prefill_ms", {}).items()}

    def _from_eval(self, where: dict) -> dict[int, float] | None:
        """Prefill latency per size from the family's cost cells (evaluation.results.ResultStore's layout:
        eval/cells/<model>/<task>.<key>.json), when they were measured the same way on this machine."""
        out = {}
        for path in sorted((self.opened.folder / "eval" / "cells").glob("*/cost.*.json")):
            try:
                cell = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            setting = cell.get("setting", {})
            same = all(setting.get(k) == where[k] for k in ("device", "dtype", "threads", "prompt_len"))
            if same and cell["model"]["series"] in ("teacher", "student", "interpolated"):
                out[int(cell["model"]["n_layers"])] = float(cell["metrics"]["prefill_ms"][0])
        return out or None
