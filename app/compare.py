"""The Compare tab: a family's sizes beside the teacher, the student and the baselines on one chart with
error bars and a Pareto frontier, other families and published tables on the same chart, the best model
within a budget, and each interpolated size beside the student distilled at it."""

from __future__ import annotations

import csv
import functools
import math
import tempfile
from pathlib import Path

import gradio as gr
from sqlmodel import Session

from app.common import bind, family_choices, safe
from boomerang.errors import BoomerangError
from boomerang.evaluation import chart
from boomerang.evaluation import compare as compare_module
from db import crud
from db.models import OPEN, Student


def result_rows(services, student_id) -> list[dict]:
    if not student_id:
        return []
    with Session(services.engine) as s:
        sizes = {z.n_layers: z for z in crud.sizes_of(session=s, student_id=int(student_id))}
        rows = []
        for r in crud.eval_results(session=s, student_id=int(student_id)):
            z = sizes.get(r.n_layers)
            blocks = f"patched {z.patched}" if z is not None and r.series in ("interpolated", "student") else ""
            rows.append({"key": r.model_key, "series": r.series, "n_layers": r.n_layers, "params": r.params,
                         "task": r.task, "metric": r.metric, "value": r.value, "stderr": r.stderr, "blocks": blocks,
                         "cell": r.cell})
    return rows


def evaluation_in_progress(services, student_id) -> str:
    """A line saying the chart is partial while an evaluation of the family is queued or running ("" otherwise)."""
    if not student_id:
        return ""
    with Session(services.engine) as s:
        student = s.get(Student, int(student_id))
        if student is None:
            return ""
        jobs = [j for j in crud.list_jobs(session=s, limit=200) if j.kind == "eval" and j.status in OPEN
                and (j.settings or {}).get("student") == student.folder]
        if not jobs:
            return ""
        job = jobs[-1]  # the oldest open one: the one running
        cells = f"{job.step} of {job.total} cells" if job.total else "starting"
        return (f"**Partial results:** evaluation job #{job.id} is {job.status.value.lower()} ({cells}); the chart "
                "fills in as cells land (the family's label-free metrics first, then its tasks, then the baselines).")


def chart_notes(services, student_id) -> str:
    """The lines above the chart: whether it is partial, and which measurement tells the family's sizes apart."""
    lines = [evaluation_in_progress(services, student_id)]
    telling = chart.most_telling(result_rows(services, student_id)) if student_id else None
    if telling:
        task, metric, snr = telling
        lines.append(f"Opens on **{task} {metric}**: the family's sizes span {snr:.0f} standard errors there, more than on "
                     "any other measurement (pick another above).")
    return "  \n".join(line for line in lines if line)


def fill_in(services, student_id, task_v, metric_v, n_seen, *rest):
    """The Compare tab's tick while an evaluation runs: when rows have landed since the chart was drawn (`n_seen`),
    (task, metric, plot, table, csv, budget line) redrawn keeping the task and metric picked, else left as they
    are (gr.skip); then the rows now charted and the partial-results line."""
    note = chart_notes(services, student_id)
    n = len(result_rows(services, student_id)) if student_id else 0
    if n == n_seen:
        return (*(gr.skip() for _ in range(6)), n_seen, note)
    tasks, metrics = task_metric_choices(services, student_id)
    t, m = (task_v, metric_v) if task_v in tasks and metric_v in metrics else opening(services, student_id)
    return (gr.update(choices=tasks, value=t), gr.update(choices=metrics, value=m),
            *compare(services, student_id, t, m, *rest), n, note)


def opening(services, student_id) -> tuple[str | None, str | None]:
    """The (task, metric) a family's chart opens on: the measurement that tells its sizes apart best (on the quick
    start: KL to the teacher, not the tasks), else the first task's accuracy."""
    tasks, metrics = task_metric_choices(services, student_id)
    telling = chart.most_telling(result_rows(services, student_id))
    if telling:
        return telling[0], telling[1]
    return (tasks[0] if tasks else None), ("acc" if "acc" in metrics else (metrics[0] if metrics else None))


def task_metric_choices(services, student_id) -> tuple[list[str], list[str]]:
    rows = result_rows(services, student_id)
    tasks = sorted({r["task"] for r in rows})
    lm_tasks = [t for t in tasks if t not in chart.NOT_AVERAGED]
    return (["average"] if len(lm_tasks) > 1 else []) + tasks, sorted({r["metric"] for r in rows})


def best_within_budget(rows: list[dict], task: str, metric: str, budget_kind: str, budget) -> dict | None:
    """The best-scoring model that fits: parameters, memory (MB of weights) or latency (prefill ms)."""
    if not budget:
        return None
    if not math.isfinite(float(budget)) or float(budget) < 0:
        raise BoomerangError(f"the budget must be a finite number of 0 or more, got {budget}")
    pts = chart.points(rows, task, metric)
    if budget_kind == "parameters":
        fits = [p for p in pts if p["params"] <= float(budget)]
    else:
        cost_metric = "weights_mb" if budget_kind == "memory (MB)" else "prefill_ms"
        cost = {r["key"]: r["value"] for r in rows if r["task"] == "cost" and r["metric"] == cost_metric}
        if cost_metric == "weights_mb":  # not measured: computed, float32 weights as the dashboard loads them
            cost = {p["key"]: cost.get(p["key"], p["params"] * 4 / 2**20) for p in pts}
        elif not any(p["key"] in cost for p in pts):
            raise BoomerangError("latency was not measured for this family: evaluate it again (the Evaluate button "
                                 "measures cost), or run boomerang eval --cost")
        fits = [p for p in pts if p["key"] in cost and cost[p["key"]] <= float(budget)]
    if not fits:
        return None
    lower = metric in chart.LOWER_IS_BETTER
    return min(fits, key=lambda p: p["value"]) if lower else max(fits, key=lambda p: p["value"])


MAX_COMPARED = 8
MAX_TABLE_BYTES = 20 * 2**20
"""Size of a published families.csv the Compare tab reads (the fidelity study's is 0.1 MB)."""


def published_families(path) -> dict[str, list[dict]]:
    """The families of a `families.csv` a user uploaded (written by `boomerang compare`: a published study, or
    a run whose folders are on another machine), as result rows; {} when none is given."""
    if not path:
        return {}
    path = Path(path)  # the Compare tab's gr.File(type="filepath") gives a path
    if path.suffix.lower() != ".csv":
        raise BoomerangError(f"a published table is a families.csv written by boomerang compare, got {path.name}")
    if path.is_file() and path.stat().st_size > MAX_TABLE_BYTES:
        raise BoomerangError(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB: a families.csv of at most "
                             f"{MAX_TABLE_BYTES // 2**20} MB is read")
    families = compare_module.published(str(path))
    if len(families) > MAX_COMPARED:
        raise BoomerangError(f"compare at most {MAX_COMPARED} other families at once: {path.name} has {len(families)}")
    return families


def compare(services, student_id, task, metric, log_x, budget_kind, budget, others=None, table=None):
    """(plotly figure, table rows, CSV path, budget message) for one family, task and metric; with `others` (family
    ids), their rows too on the same chart under one Pareto frontier (keys "#ID:model"); with `table` (a
    `families.csv` of `boomerang compare`), its families too (keys "NAME:model")."""
    rows = result_rows(services, student_id)
    others = [o for o in (others or []) if o and str(o) != str(student_id)]
    if len(others) > MAX_COMPARED:
        raise BoomerangError(f"compare at most {MAX_COMPARED} other families at once, got {len(others)}")
    tables = published_families(table)
    if rows and (others or tables):
        rows = chart.combine({f"#{student_id}": rows, **{f"#{o}": result_rows(services, o) for o in others},
                              **{f"{n} (table)" if n.startswith("#") else n: r for n, r in tables.items()}})
    if not rows or not task or not metric:
        return None, [], None, "No results yet: evaluate a family from the Jobs tab."
    pts = chart.points(rows, task, metric)
    try:
        best = best_within_budget(rows, task, metric, budget_kind, budget)
    except BoomerangError as exc:
        best, budget, refused = None, None, f"**Budget refused:** {exc}"
    else:
        refused = ""
    fig = chart.figure(pts, task, metric, log_x=bool(log_x), highlight=best["key"] if best else None)
    beaten = chart.dominated_by(pts, metric not in chart.LOWER_IS_BETTER)

    def pareto_cell(r):  # for the charted task and metric only
        if r["task"] != task or r["metric"] != metric or r["key"] not in beaten:
            return ""
        return f"dominated by {beaten[r['key']]}" if beaten[r["key"]] else "frontier"

    table = [[r["key"], r["series"], r["n_layers"], r["params"], r["task"], r["metric"], round(r["value"], 5),
              "" if r["stderr"] is None else round(r["stderr"], 5), pareto_cell(r)] for r in rows]
    path = Path(tempfile.mkdtemp(prefix="boomerang-results-")) / f"family-{student_id}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "series", "layers", "params", "task", "metric", "value", "stderr", "pareto"])
        writer.writerows(table)
    message = refused
    if budget:
        message = (f"**Best within the budget:** {best['key']} ({best['n_layers']} layers, {best['params']:,} "
                   f"parameters): {metric} {best['value']:.4f}" if best else "**Nothing fits this budget.**")
    noise = chart.noise_note(pts)
    hidden = 0 if task == "average" else chart.one_measurement(rows, task, metric)[1]
    mixed = (f"{hidden} results of {task} measured with other settings (limit, held-out text, patch order or "
             f"ends) are left out of the chart." if hidden else "")
    gaps = chart.at_size_gaps(pts, metric)  # the paper's central comparison, for the charted task and metric
    at_size = ("**Interpolated sizes beside students distilled at the size** (more than 2 standard errors apart "
               "to count):\n" + "\n".join(f"- {chart.gap_line(g, metric)}" for g in gaps)) if gaps else ""
    message = "\n\n".join(m for m in (message, noise, mixed, at_size) if m)
    return fig, table, str(path), message


# ----------------------------------------------------------------------------- the tab

def tab(services):
    with gr.Row():
        family = gr.Dropdown(family_choices(services), label="Family", elem_id="compare-family", allow_custom_value=True)
        task = gr.Dropdown([], label="Task (or average)", elem_id="compare-task")
        metric = gr.Dropdown([], label="Metric", elem_id="compare-metric")
        log_x = gr.Checkbox(False, label="Log parameter axis")
    with gr.Row():
        budget_kind = gr.Radio(["parameters", "memory (MB)", "latency (ms)"], value="parameters", label="Fit my budget")
        budget = gr.Number(None, label="Budget")
        others = gr.Dropdown(family_choices(services), value=[], multiselect=True, label="Compare with",
                             elem_id="compare-others", info="other families of the same teacher (recipes, budgets, "
                             "checkpoints): one chart, one Pareto frontier")
        published = gr.File(None, file_types=[".csv"], type="filepath", label="…and a families.csv (boomerang compare)",
                            elem_id="compare-published", height=120)
    partial_md = gr.Markdown(elem_id="compare-note")
    budget_md = gr.Markdown(elem_id="budget-result")
    plot = gr.Plot(elem_id="compare-plot")
    table = gr.Dataframe(headers=["model", "series", "layers", "params", "task", "metric", "value", "stderr", "pareto"],
                         interactive=False)
    csv_file = gr.File(label="Download CSV")

    def pick_family(student_id):
        if not student_id:
            return gr.update(), gr.update()
        tasks, metrics = task_metric_choices(services, student_id)
        t, m = opening(services, student_id)
        return gr.update(choices=tasks, value=t), gr.update(choices=metrics, value=m)

    inputs = [family, task, metric, log_x, budget_kind, budget, others, published]
    outputs = [plot, table, csv_file, budget_md]

    # the chart follows the family's defaults at once, then every change the user makes
    def show_family(student_id, *rest):
        task_update, metric_update = pick_family(student_id)
        t = task_update.get("value") if isinstance(task_update, dict) else None
        m = metric_update.get("value") if isinstance(metric_update, dict) else None
        others_update = gr.update(choices=[c for c in family_choices(services) if c[1] != student_id])
        return (task_update, metric_update, others_update, *compare(services, student_id, t, m, *rest),
                len(result_rows(services, student_id)), chart_notes(services, student_id))

    seen = gr.State(0)  # rows charted: a tick redraws only when cells have landed since
    show = (show_family, [family, log_x, budget_kind, budget, others, published],
            [task, metric, others, *outputs, seen, partial_md])

    timer = gr.Timer(10.0)
    timer.tick(safe(functools.partial(fill_in, services)),
               [family, task, metric, seen, log_x, budget_kind, budget, others, published],
               [task, metric, *outputs, seen, partial_md], show_progress="hidden", api_name=False)
    family.input(safe(show[0]), *show[1:])
    for control in (task, metric, budget):
        control.input(bind(compare, services), inputs, outputs)
    for control in (log_x, budget_kind, published):
        control.change(bind(compare, services), inputs, outputs)
    others.input(bind(compare, services), inputs, outputs)
    return family, show
