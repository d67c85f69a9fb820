"""Evaluation results on disk: one JSON file per (model, task, settings) cell, and the family table.

A cell's file name carries a hash of everything its score depends on (task definition, n-shot,
limit, seed, lm-eval version), so evaluating again with the same settings finds the file and does
nothing, and a change of settings gives a new cell instead of overwriting the old one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from boomerang.evaluation import provenance


@dataclass(frozen=True)
class ModelEntry:
    """One model measured: a family size, a baseline or a reference."""

    key: str
    """Unique name, e.g. "interpolated-23", "drop-bi-20", "reference-qwen3-0.6b"."""
    series: str
    """interpolated | teacher | student | undistilled | drop-bi | reference."""
    n_layers: int
    params: int
    params_no_embed: int
    blocks: str = ""
    """What runs (compressed), for hover text."""


def cell_key(task: dict | str, settings: dict) -> str:
    import lm_eval  # lm-eval takes seconds to import

    payload = json.dumps({"task": task, "settings": {k: v for k, v in settings.items() if k != "batch_size"},
                          "lm_eval": lm_eval.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, model_key: str, task_name: str, key: str) -> Path:
        return self.root / "cells" / model_key / f"{task_name}.{key}.json"

    def get(self, model_key: str, task_name: str, key: str, *, model: ModelEntry | None = None) -> dict | None:
        """The cell on disk, or None; with `model`, only if it measured that same model (same layers, ends and
        parameters: a size built another way, or a baseline ranked on other text, is measured again)."""
        path = self.path(model_key, task_name, key)
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        if model is not None and cell.get("model") != asdict(model):
            return None
        return cell

    def put(self, entry: ModelEntry, task_name: str, key: str, result: dict) -> Path:
        path = self.path(entry.key, task_name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": asdict(entry), **result}, indent=2, default=str) + "\n")
        os.replace(tmp, path)  # a killed run never leaves a half-written cell
        return path

    def rows(self, cells: list[Path] | None = None) -> list[dict]:
        """Every (model, task, metric) value on disk, flat; with `cells`, those cells' only (one request's)."""
        out = []
        paths = sorted((self.root / "cells").glob("*/*.json")) if cells is None else [p for p in cells if p.is_file()]
        for path in paths:
            cell = json.loads(path.read_text())
            for metric, (value, stderr) in cell.get("metrics", {}).items():
                out.append({**cell["model"], "task": cell["task"], "metric": metric, "value": value,
                            "stderr": stderr, "cell": path.name, "settings": cell.get("settings", {}),
                            "provenance": cell.get("provenance")})
        return out

    def write_table(self, path: str | Path | None = None, rows: list[dict] | None = None) -> Path:
        """The CSV of `rows` (default: every cell on disk)."""
        path = Path(path) if path else self.root / "family.csv"
        rows = self.rows() if rows is None else rows
        fields = ["key", "series", "n_layers", "params", "params_no_embed", "task", "metric", "value", "stderr",
                  "blocks", "cell", *provenance.FIELDS]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**r, **provenance.columns(r)} for r in rows)
        return path
