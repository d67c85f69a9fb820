"""lm-eval task definitions for local evaluation files, so every size can be scored offline.

Three formats are understood, told apart by the keys of a file's first line:
- multiple choice `{query, choices, gold}`: score `query + " " + choice`, predict the most likely;
- partial scoring `{context_options, continuation, gold}` (WinoGrande-style): score the same
  continuation after each context;
- cloze `{context, continuation}` (LAMBADA-style): log-likelihood and greedy exact match of the
  continuation.

Each `.jsonl` file in a data folder becomes one task named after the file (`arc_easy_test.jsonl` ->
`arc_easy_test`); `NAME.partKofN.jsonl` files are joined into one task `NAME`. Definitions are
dicts that lm-eval's TaskManager loads directly; no YAML is written anywhere.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from boomerang.data import jsonl_rows
from boomerang.errors import BoomerangError

FORMATS = {
    "multiple_choice": {"query", "choices", "gold"},
    "partial": {"context_options", "continuation", "gold"},
    "cloze": {"context", "continuation"},
}
_PART = re.compile(r"^(?P<name>.+)\.part\d+of\d+$")
VERSION = 1


@dataclass(frozen=True)
class LocalTask:
    name: str
    format: str
    files: tuple[Path, ...]

    def config(self) -> dict:
        """The lm-eval task config for this file set."""
        base: dict = {
            "task": self.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": [str(f) for f in self.files]}},
            "test_split": "test",
            "metadata": {"version": VERSION, "boomerang_format": self.format},
        }
        if self.format == "multiple_choice":
            base.update(output_type="multiple_choice", doc_to_text="{{query}}", doc_to_choice="choices",
                        doc_to_target="gold", target_delimiter=" ",
                        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                     {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
        elif self.format == "partial":
            # doc_to_text names an int field: lm-eval then treats the choices as contexts for one continuation
            base.update(output_type="multiple_choice", doc_to_text="gold", doc_to_choice="context_options",
                        doc_to_target="continuation", target_delimiter=" ",
                        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
        else:
            # lm-eval adds no delimiter to loglikelihood targets: the space goes into the target itself
            base.update(output_type="loglikelihood", doc_to_text="{{context}}", doc_to_target="{{' ' + continuation}}",
                        target_delimiter="",
                        metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                     {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
        return base


def detect_format(path: Path) -> str | None:
    """The format of a .jsonl file from its first line's keys; None if it is none of ours."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        keys = set(json.loads(first))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None
    for name, needed in FORMATS.items():
        if needed <= keys:
            return name
    return None


def _groups(data_dir: str | Path) -> dict[str, list[Path]]:
    """The .jsonl files of a data folder grouped by task name (parts joined)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise BoomerangError(f"evaluation data folder not found: {root}")
    groups: dict[str, list[Path]] = {}
    for f in sorted(root.glob("*.jsonl")):
        match = _PART.match(f.stem)
        name = re.sub(r"[^A-Za-z0-9_]", "_", match["name"] if match else f.stem)
        groups.setdefault(name, []).append(f)
    return groups


def discover(data_dir: str | Path) -> dict[str, LocalTask]:
    """Every task in a data folder, by name (files in none of the formats are left out)."""
    tasks = {}
    for name, files in _groups(data_dir).items():
        fmt = detect_format(files[0])
        if fmt:
            tasks[name] = LocalTask(name, fmt, tuple(files))
    return tasks


def check_files(name: str, files: list[Path]) -> str:
    """The format of a task's files, every line checked: a broken line or a missing key is named by file and line."""
    fmt = detect_format(files[0])
    for path in files:
        for number, item in jsonl_rows(path):
            keys = set(item) if isinstance(item, dict) else set()
            if fmt is None:
                options = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in FORMATS.items())
                raise BoomerangError(f"{path}, line {number}: task {name!r} is in none of the formats "
                                     f"(keys {sorted(keys)}; expected {options})")
            missing = sorted(FORMATS[fmt] - keys)
            if missing:
                raise BoomerangError(f"{path}, line {number}: missing {', '.join(missing)} (a {fmt} task)")
    if fmt is None:
        raise BoomerangError(f"{files[0]}: task {name!r} has no items")
    return fmt


SHIPPED_DIR = Path(__file__).with_name("tasks")
"""Small multiple-choice sets shipped with the package (tasks/README.md: sources and licences)."""


def shipped_tasks() -> list[str]:
    """The names of the shipped tasks: what an evaluation runs when it is given none."""
    return sorted(discover(SHIPPED_DIR))


def resolve(task_names: list[str], data_dir: str | Path | None) -> list[dict | str]:
    """Local task configs for names found in `data_dir` or among the shipped tasks (`data_dir` first);
    other names are passed to lm-eval's registry."""
    groups = {**_groups(SHIPPED_DIR), **(_groups(data_dir) if data_dir else {})}
    out: list[dict | str] = []
    for name in task_names:
        if name in groups:
            out.append(LocalTask(name, check_files(name, groups[name]), tuple(groups[name])).config())
        elif not _registry_allowed():
            where = f"{data_dir} or the shipped tasks" if data_dir else "the shipped tasks (give --data-dir for your own files)"
            found = sorted({*discover(SHIPPED_DIR), *(discover(data_dir) if data_dir else {})})
            raise BoomerangError(
                f"no task {name!r} in {where} (found: {', '.join(found)}), and lm-eval's registry tasks need "
                "the hub to download their data (HF_DATASETS_OFFLINE=1 here)"
            )
        else:
            out.append(name)
    return out


def _registry_allowed() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") != "1" and os.environ.get("HF_HUB_OFFLINE") != "1"
