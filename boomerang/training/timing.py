"""How long a distillation will take here, from what earlier runs on this machine measured.

Every run records its measured rates under `$BOOMERANG_HOME/timing.json`, per teacher (weights
fingerprint), device and recipe kind: tokens/s while the teacher wrote its corpus, seconds to
measure layer importance, and training tokens/s. `estimate` turns a planned run into seconds, phase
by phase, from the closest record; with none it says so (nothing is guessed from other hardware).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from boomerang.paths import boomerang_home, write_record

FILE = "timing.json"


def _path() -> Path:
    return boomerang_home() / FILE


def _key(fingerprint: str, device: str, mixed: bool) -> str:
    # a recipe that trains mixed sizes runs other layer counts half the time: its rate differs from the paper's
    return f"{fingerprint}|{device}|{'mixed' if mixed else 'student'}"


def read_all() -> dict:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(fingerprint: str, device: str, mixed: bool, **rates: float | None) -> None:
    """Merge measured rates (None values are skipped) into the record; written atomically."""
    data = read_all()
    entry = data.setdefault(_key(fingerprint, device, mixed), {})
    entry.update({k: float(v) for k, v in rates.items() if v is not None and v > 0})
    entry["at"] = time.strftime("%Y-%m-%d %H:%M")
    write_record(_path(), data)  # a read-only home loses the record, never the run


@dataclass
class Estimate:
    seconds: float
    parts: dict[str, float]
    """Seconds per phase."""
    measured_at: str
    device: str


def estimate(fingerprint: str, device: str, *, steps: int, tokens_per_step: int, mixed: bool,
             corpus_tokens: int = 0, importance: bool = False) -> Estimate | None:
    """Seconds for a planned run from this machine's record of the same teacher and device (the same
    kind of recipe preferred); None when no run of that teacher on that device was measured here."""
    data = read_all()
    entry = data.get(_key(fingerprint, device, mixed)) or data.get(_key(fingerprint, device, not mixed))
    if not entry or "train_tokens_per_s" not in entry:
        return None
    parts = {"training": steps * tokens_per_step / entry["train_tokens_per_s"]}
    if corpus_tokens:
        if "corpus_tokens_per_s" not in entry:
            return None
        parts["writing the teacher's corpus"] = corpus_tokens / entry["corpus_tokens_per_s"]
    if importance and "importance_s" in entry:
        parts["measuring layer importance"] = entry["importance_s"]
    return Estimate(sum(parts.values()), parts, entry.get("at", "?"), device)
