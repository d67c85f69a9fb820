"""Several families of one teacher (runs with other recipes, budgets or ends) on one chart, with one Pareto frontier
over every series of every family: which sizes are worth deploying against everything measured."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.evaluation import chart
from boomerang.evaluation.results import ResultStore

@dataclass
class Comparison:
    rows: list[dict]
    """Every family's rows, combined (`chart.combine`)."""
    frontiers: dict[tuple[str, str], list[str]]
    """(task, metric) -> keys on the Pareto frontier, smallest first."""
    table: Path
    charts: list[Path]


def results_of(folder: str | Path) -> Path:
    """A results folder: FOLDER itself when it holds cells, else a student folder's `eval/`."""
    folder = Path(folder).expanduser()
    for candidate in (folder, folder / "eval"):
        if (candidate / "cells").is_dir():
            return candidate
    raise BoomerangError(f"no evaluation results in {folder}: evaluate it first (boomerang eval {folder})")


def family_name(folder: str | Path) -> str:
    """A run's name: the run folder of RUN/student (or RUN/student/eval), else the folder's own name."""
    folder = Path(folder).expanduser().resolve()
    if folder.name == "eval":
        folder = folder.parent
    return folder.parent.name if folder.name == "student" else folder.name


def compare_families(folders: list[str], out: str | Path, *, names: list[str] | None = None,
                     chart_metric: str = "acc") -> Comparison:
    if len(folders) < 1:
        raise BoomerangError("name at least one evaluated family")
    names = list(names or [family_name(f) for f in folders])
    if len(names) != len(folders):
        raise BoomerangError(f"{len(folders)} families but {len(names)} names")
    if len(set(names)) != len(names):
        raise BoomerangError(f"two families have the same name ({', '.join(names)}): give --name for each")
    rows = chart.combine({name: ResultStore(results_of(f)).rows() for name, f in zip(names, folders)})
    out = Path(out).expanduser()
    tasks = sorted({r["task"] for r in rows} - {"cost"})
    lm = [t for t in tasks if t not in chart.NOT_AVERAGED]
    wanted = [(t, chart_metric) for t in lm] + ([("average", chart_metric)] if len(lm) > 1 else [])
    wanted += [(t, m) for t in tasks if t in chart.LABEL_FREE for m in chart.LABEL_FREE_METRICS]
    frontiers, charts, pareto_of = {}, [], {}
    for task, metric in wanted:
        pts = chart.points(rows, task, metric)
        if not pts:
            continue
        higher = metric not in chart.LOWER_IS_BETTER
        frontiers[(task, metric)] = [p["key"] for p in chart.pareto(pts, higher)]
        for key, by in chart.dominated_by(pts, higher).items():
            pareto_of[(key, task, metric)] = f"dominated by {by}" if by else "frontier"
        charts += chart.save(pts, task, metric, out / "charts")
    table = out / "families.csv"
    out.mkdir(parents=True, exist_ok=True)
    fields = ["family", "key", "series", "n_layers", "params", "task", "metric", "value", "stderr", "pareto", "cell"]
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "pareto": pareto_of.get((r["key"], r["task"], r["metric"]), "")})
    return Comparison(rows, frontiers, table, charts)
