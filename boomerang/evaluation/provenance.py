"""How each number was made: kept in every cell the evaluation computes, carried by its rows into the CSVs and the
database, and summed up in one line under the chart.

A cell's key already fixes what its score depends on (task definition, items, few-shot, seed, dtype, lm-eval
version); the record adds what a reader needs to reproduce or doubt it: library versions, device, the task files'
content (the key names their paths), and the recipe of the family that made the model.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import boomerang

FIELDS = ("lm_eval", "transformers", "torch", "boomerang", "device", "dtype", "items", "fewshot", "seed", "task_hash",
          "recipe_hash", "chance")
"""The provenance columns of family.csv, families.csv and the Compare tab's CSV (blank for cells measured before
provenance was kept)."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def file_hash(paths: list[str | Path]) -> str:
    """The first 12 hex digits of SHA-256 over the files' bytes, in order ("" when any is missing)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            return ""
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def task_hash(spec: dict | str) -> str:
    """The content hash of a local task's files (a registry task: "", lm-eval's own version names it)."""
    if not isinstance(spec, dict):
        return ""
    files = (spec.get("dataset_kwargs") or {}).get("data_files", {}).get("test", [])
    return file_hash(files)


def base(model, recipe: str | Path | None) -> dict:
    """What every cell of one evaluation shares: versions, the device and dtype the models ran in, and the hash of
    the family's recipe file (None when not distilled by this tool)."""
    param = next(model.parameters())
    return {"lm_eval": _version("lm_eval"), "transformers": _version("transformers"), "torch": _version("torch"),
            "boomerang": boomerang.__version__, "device": str(param.device),
            "dtype": str(param.dtype).removeprefix("torch."),
            "recipe_hash": file_hash([recipe]) if recipe else ""}


def of_cell(common: dict, task: dict | str, result: dict, settings: dict) -> dict:
    """One cell's record: `common` (see `base`), its items (lm-eval's effective count, or the label-free tokens),
    few-shot and seed (lm-eval tasks), its task files' hash and the accuracy of guessing (the mean of 1 / choices over
    its items; "" for a task with one continuation per item)."""
    samples = result.get("n-samples") or {}
    items = samples.get("effective") if isinstance(samples, dict) and samples else result.get("tokens", "")
    lm = isinstance(task, dict) or result.get("results") is not None
    choices = [len(i.get("ll") or []) for i in result.get("items") or []]
    chance = sum(1 / n for n in choices) / len(choices) if choices and min(choices) > 1 else ""
    return {**common, "items": items if items is not None else "", "fewshot": settings.get("num_fewshot", "") if lm else "",
            "seed": settings.get("seed", "") if lm else "", "task_hash": task_hash(task), "chance": chance}


def columns(row: dict) -> dict:
    """A row's provenance as CSV columns (FIELDS; blank where unknown)."""
    made = row.get("provenance") or ((row.get("settings") or {}) if isinstance(row.get("settings"), dict) else {}).get(
        "provenance") or {f: row.get(f, "") for f in FIELDS}  # a families.csv read back: the columns themselves
    return {f: made.get(f, "") for f in FIELDS}


def line(rows: list[dict]) -> str:
    """One line under a chart: how its numbers were made, each field once when every row agrees, else its values."""
    records = [columns(r) for r in rows]
    known = [r for r in records if any(r.values())]
    if not known:
        return ""
    parts = []
    labels = {"lm_eval": "lm-eval", "transformers": "transformers", "torch": "torch", "device": "on", "dtype": "in",
              "items": "items", "fewshot": "few-shot", "seed": "seed", "task_hash": "task files",
              "recipe_hash": "recipe"}
    for field, label in labels.items():
        values = sorted({str(r[field]) for r in known if r[field] != ""})
        if values:
            parts.append(f"{label} {' / '.join(values)}")
    missing = len(records) - len(known)
    tail = f" ({missing} of {len(records)} results measured before this was recorded)" if missing else ""
    return "Measured with " + ", ".join(parts) + tail + "."
