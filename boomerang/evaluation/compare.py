"""Several families of one teacher (runs with other recipes, budgets or ends) on one chart, with one Pareto frontier
over every series of every family: which sizes are worth deploying against everything measured."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.evaluation import budget, chart, provenance
from boomerang.evaluation.results import ResultStore
from boomerang.student import MANIFEST

GAP_FIELDS = ["family", "n_layers", "task", "metric", "interpolated", "distilled", "difference", "stderr", "relative",
              "winner"]
"""The columns of `at-size.csv`: the paper's central comparison, one row per size and metric."""
TABLE_FIELDS = ["family", "key", "series", "n_layers", "params", "params_no_embed", "task", "metric", "value", "stderr", "pareto", "cell",
                *budget.COST_FIELDS, *provenance.FIELDS]
"""The columns of `families.csv` (written by `compare_families`, read back by `published`; tables written before
the training costs were kept lack those)."""
BUDGET_FIELDS = [*GAP_FIELDS, "family_tokens", "split_tokens"]
"""The columns of `equal-budget.csv`: each size of a family beside the student distilled at it with 1/K of the
family's budget (`budget.equal_budget`)."""


@dataclass
class Comparison:
    rows: list[dict]
    """Every family's rows, combined (`chart.combine`)."""
    frontiers: dict[tuple[str, str], list[str]]
    """(task, metric) -> keys on the Pareto frontier, smallest first."""
    table: Path
    charts: list[Path]
    gaps: dict[tuple[str, str], list[dict]]
    """(task, metric) -> every interpolated size beside the student distilled at that size (`chart.at_size_gaps`),
    for the charts that have such pairs; also written to `at-size.csv`."""
    budget: dict[tuple[str, str], list[dict]]
    """(task, metric) -> every interpolated size beside the student distilled at it with a split of the family's
    budget (`budget.equal_budget`); also written to `equal-budget.csv`, and charted against total tokens."""


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


def published(spec: str) -> dict[str, list[dict]]:
    """The families of an earlier comparison's `families.csv` ("PATH.csv", or "PATH.csv:NAME,NAME" for some of
    them), as rows like a results folder's: a user's run beside a published study's numbers (whose run folders
    they do not have). The teacher's rows come with the first family; `chart.combine` keeps them once."""
    head, _, wanted = spec.partition(".csv:")
    path = Path(head + ".csv" if wanted else spec).expanduser()
    if not path.is_file():
        raise BoomerangError(f"no such table: {path} (a families.csv written by boomerang compare)")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    needed = set(TABLE_FIELDS) - {"pareto", "params_no_embed", *budget.COST_FIELDS, *provenance.FIELDS}  # what a row needs; the Pareto column is computed again
    if not table or not needed <= set(table[0]):
        raise BoomerangError(f"{path} is not a families.csv written by boomerang compare (columns {sorted(needed)})")
    present = list(dict.fromkeys(r["family"] for r in table if r["family"]))
    names = [n.strip() for n in wanted.split(",") if n.strip()] if wanted else present
    missing = [n for n in names if n not in present]
    if missing or not names:
        raise BoomerangError(f"{path} has no family {', '.join(missing) or '(none named)'}: it has {', '.join(present)}")
    families: dict[str, list[dict]] = {n: [] for n in names}
    for line, r in enumerate(table, start=2):
        if r["family"] and r["family"] not in families:
            continue
        try:
            row = {**r, "n_layers": int(r["n_layers"]), "params": int(r["params"]), "value": float(r["value"]),
                   "stderr": float(r["stderr"]) if r["stderr"] else None,
                   "train_tokens": int(r["train_tokens"]) if r.get("train_tokens") else ""}
        except (TypeError, ValueError):
            raise BoomerangError(f"{path}, line {line}: n_layers, params, value and stderr must be numbers") from None
        if r["family"]:
            row["key"] = r["key"].removeprefix(f"{r['family']}:")
        families[r["family"] or names[0]].append(row)
    return families


def is_table(spec: str) -> bool:
    return spec.endswith(".csv") or ".csv:" in spec


def compare_families(folders: list[str], out: str | Path, *, names: list[str] | None = None,
                     chart_metric: str = "acc", x_axis: str = "parameters", chance: bool = False) -> Comparison:
    """Families (student or results folders, and `families.csv` tables of earlier comparisons: see `published`) on
    one chart. `names` name the folders, in order (default: their run folders). `x_axis`: one of chart.X_AXES (the
    charts' x and their Pareto frontiers); `chance`: accuracies chance-normalised (0 = guessing) in the charts."""
    if x_axis not in chart.X_AXES:
        raise BoomerangError(f"unknown x axis {x_axis!r}: one of {', '.join(chart.X_AXES)}")
    if len(folders) < 1:
        raise BoomerangError("name at least one evaluated family")
    tables = [f for f in folders if is_table(f)]
    folders = [f for f in folders if not is_table(f)]
    names = list(names or [family_name(f) for f in folders])
    if len(names) != len(folders):
        raise BoomerangError(f"{len(folders)} families but {len(names)} names")
    if len(set(names)) != len(names):
        raise BoomerangError(f"two families have the same name ({', '.join(names)}): give --name for each")
    families = {name: with_training(f, ResultStore(results_of(f)).rows()) for name, f in zip(names, folders, strict=False)}
    for spec in tables:
        for name, rows in published(spec).items():
            if name in families:
                raise BoomerangError(f"two families have the same name ({name}): give the folder another --name, "
                                     f"or take only some of the table's families (PATH.csv:NAME,NAME)")
            families[name] = rows
    rows = chart.combine(families)
    out = Path(out).expanduser()
    tasks = sorted({r["task"] for r in rows} - {"cost"})
    lm = [t for t in tasks if t not in chart.NOT_AVERAGED]
    wanted = [(t, chart_metric) for t in lm] + ([("average", chart_metric)] if len(lm) > 1 else [])
    wanted += [(t, m) for t in tasks if t in chart.LABEL_FREE for m in chart.LABEL_FREE_METRICS]
    frontiers: dict = {}
    charts: list[Path] = []
    pareto_of: dict = {}
    gaps: dict = {}
    split: dict = {}
    charted = chart.chance_normalised(rows) if chance else rows
    for task, metric in wanted:
        measured = chart.points(charted, task, metric)
        pts = chart.on_axis(measured, charted, x_axis)[0]  # the charts' points: those with an x on the axis
        if pairs := chart.at_size_gaps(measured, metric):
            gaps[(task, metric)] = pairs
        if pairs := budget.equal_budget(measured, metric):
            split[(task, metric)] = pairs
            fig = budget.figure(measured, task, metric)
            if fig is not None:
                (out / "charts").mkdir(parents=True, exist_ok=True)
                fig.write_html(out / "charts" / f"budget-{task}-{metric}.html", include_plotlyjs="cdn")
                charts.append(out / "charts" / f"budget-{task}-{metric}.html")
        if not pts:
            continue
        higher = metric not in chart.LOWER_IS_BETTER
        frontiers[(task, metric)] = [p["key"] for p in chart.pareto(pts, higher)]
        for key, by in chart.dominated_by(pts, higher).items():
            pareto_of[(key, task, metric)] = f"dominated by {by}" if by else "frontier"
        charts += chart.save(pts, task, metric, out / "charts", x_axis=x_axis)
    table = out / "families.csv"
    out.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **provenance.columns(r), "pareto": pareto_of.get((r["key"], r["task"], r["metric"]), "")})
    _write_gaps(gaps, out / "at-size.csv")
    _write_gaps(split, out / "equal-budget.csv", BUDGET_FIELDS)
    return Comparison(rows, frontiers, table, charts, gaps, split)


def with_training(folder: str | Path, rows: list[dict]) -> list[dict]:
    """A results folder's rows with what each model cost to train (`budget.with_costs`), when the folder is a
    student folder's `eval/` (or the student folder) and the student was distilled by this tool."""
    results = results_of(folder)
    student = results.parent if results.name == "eval" else results
    return budget.with_costs(rows, budget.training_costs(student) if (student / MANIFEST).is_file() else {})


def _write_gaps(gaps: dict[tuple[str, str], list[dict]], path: Path, fields: list[str] = GAP_FIELDS) -> None:
    """`at-size.csv` (GAP_FIELDS); an earlier comparison's file is removed when these families have no pair, so a
    folder never shows the gaps of families it no longer compares."""
    if not gaps:
        path.unlink(missing_ok=True)
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for (task, metric), pairs in gaps.items():
            for g in pairs:
                writer.writerow({**g, "task": task, "metric": metric})
