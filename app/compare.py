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
from boomerang.evaluation import budget, chart, items, provenance
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
                         "cell": r.cell, "settings": r.settings or {},
                         # every model of one teacher's layer count has the same shape but a reference
                         "params_no_embed": (r.settings or {}).get("params_no_embed") or (
                             z.params_no_embed if z is not None and r.series != "reference" else None)})
        folder = student.folder if (student := s.get(Student, int(student_id))) is not None else None
    costs = {}
    if folder and Path(folder).is_dir():
        log = Path(folder) / "metrics.jsonl"
        costs = _training_costs(folder, len(rows), log.stat().st_mtime_ns if log.is_file() else 0)
    return budget.with_costs(rows, costs)


@functools.lru_cache(maxsize=32)
def _training_costs(folder: str, n_rows: int, log_stamp: int) -> dict[str, dict]:
    """`budget.training_costs`, read again only when the family's rows or its training log change: the tab's tick
    asks for the rows every 10 s, and the costs read every manifest and training log of the family's students."""
    return budget.training_costs(folder)


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


_TELLING: dict[tuple, tuple | None] = {}
"""chart.most_telling by (family, rows): computed once per set of rows, not on every tick of the timer."""


def most_telling(student_id, rows: list[dict]) -> tuple[str, str, float] | None:
    key = (str(student_id), len(rows), sum(hash((r["key"], r["task"], r["metric"], r["cell"])) for r in rows))
    if key not in _TELLING:
        if len(_TELLING) > 64:
            _TELLING.clear()
        _TELLING[key] = chart.most_telling(rows)
    return _TELLING[key]


def chart_notes(services, student_id, rows: list[dict] | None = None) -> str:
    """The lines above the chart: whether it is partial, and which measurement tells the family's sizes apart."""
    lines = [evaluation_in_progress(services, student_id)]
    if student_id and rows is None:
        rows = result_rows(services, student_id)
    telling = most_telling(student_id, rows) if student_id else None
    if telling:
        task, metric, snr = telling
        lines.append(f"Opens on **{task} {metric}**: the family's sizes span {snr:.0f} standard errors there, more than on "
                     "any other measurement (pick another above).")
    return "  \n".join(line for line in lines if line)


def fill_in(services, student_id, task_v, metric_v, n_seen, *rest, rows: list[dict] | None = None):
    """The Compare tab's tick while an evaluation runs: when rows have landed since the chart was drawn (`n_seen`),
    (task, metric, plot, table, csv, budget line, equal-budget plot) redrawn keeping the task and metric picked, else left as they
    are (gr.skip); then the rows now charted and the partial-results line."""
    if rows is None:
        rows = result_rows(services, student_id) if student_id else []  # read once a tick, passed down
    note = chart_notes(services, student_id, rows)
    if len(rows) == n_seen:
        return (*(gr.skip() for _ in range(7)), n_seen, note)
    tasks, metrics = task_metric_choices(services, student_id, rows)
    t, m = (task_v, metric_v) if task_v in tasks and metric_v in metrics else opening(services, student_id, rows)
    return (gr.update(choices=tasks, value=t), gr.update(choices=metrics, value=m),
            *compare(services, student_id, t, m, *rest, rows=rows), len(rows), note)


def opening(services, student_id, rows: list[dict] | None = None) -> tuple[str | None, str | None]:
    """The (task, metric) a family's chart opens on: the measurement that tells its sizes apart best (on the quick
    start: KL to the teacher, not the tasks), else the first task's accuracy."""
    rows = result_rows(services, student_id) if rows is None else rows
    tasks, metrics = task_metric_choices(services, student_id, rows)
    telling = most_telling(student_id, rows)
    if telling:
        return telling[0], telling[1]
    return (tasks[0] if tasks else None), ("acc" if "acc" in metrics else (metrics[0] if metrics else None))


def task_metric_choices(services, student_id, rows: list[dict] | None = None) -> tuple[list[str], list[str]]:
    rows = result_rows(services, student_id) if rows is None else rows
    tasks = sorted({r["task"] for r in rows})
    lm_tasks = [t for t in tasks if t not in chart.NOT_AVERAGED]
    return (["average"] if len(lm_tasks) > 1 else []) + tasks, sorted({r["metric"] for r in rows})


BUDGET_ALIASES = {"latency (ms)": "prefill latency (ms)"}
"""Budget kinds by their earlier names."""


def best_within_budget(rows: list[dict], task: str, metric: str, budget_kind: str, limit) -> dict | None:
    """The best-scoring model that fits: at most `limit` on one of chart.X_AXES (parameters, parameters without
    embeddings, decode or prefill latency, memory in MB of weights)."""
    if not limit:
        return None
    if not math.isfinite(float(limit)) or float(limit) < 0:
        raise BoomerangError(f"the budget must be a finite number of 0 or more, got {limit}")
    kind = BUDGET_ALIASES.get(budget_kind, budget_kind)
    if kind not in chart.X_AXES:
        raise BoomerangError(f"unknown budget {budget_kind!r}: one of {', '.join(chart.X_AXES)}")
    pts = chart.points(rows, task, metric)
    cost = chart.x_of(rows, kind)
    if kind == "memory (MB)":  # not measured: computed, float32 weights as the dashboard loads them
        cost = {p["key"]: cost.get(p["key"], p["params"] * 4 / 2**20) for p in pts}
    elif kind in ("decode latency (ms/token)", "prefill latency (ms)") and not any(p["key"] in cost for p in pts):
        raise BoomerangError("latency was not measured for this family: evaluate it again (the Evaluate button "
                             "measures cost), or run boomerang eval --cost")
    fits = [p for p in pts if p["key"] in cost and cost[p["key"]] <= float(limit)]
    if not fits:
        return None
    lower = metric in chart.LOWER_IS_BETTER
    return min(fits, key=lambda p: p["value"]) if lower else max(fits, key=lambda p: p["value"])


TABLE_HEADERS = ["model", "series", "layers", "params", "task", "metric", "value", "stderr", "pareto", "train tokens",
                 "on the x axis"]
"""The table's and its CSV's columns; train tokens: of the run that made the model (a family's sizes share one); on
the x axis: the model's value on the axis charted (parameters, latency, memory)."""
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


def compare(services, student_id, task, metric, log_x, budget_kind, budget_value, others=None, table=None,
            x_axis="parameters", chance=False, per_task=False, *, rows: list[dict] | None = None):
    """(plotly figure, table rows, CSV path, budget message, equal-budget figure or None) for one family, task and metric; with `others` (family
    ids), their rows too on the same chart under one Pareto frontier (keys "#ID:model"); with `table` (a
    `families.csv` of `boomerang compare`), its families too (keys "NAME:model"). `x_axis`: one of chart.X_AXES;
    `chance`: accuracies chance-normalised (0 = guessing); `per_task`: a panel per task beside the average. `rows`:
    the family's `result_rows` when the caller has read them already."""
    rows = result_rows(services, student_id) if rows is None else rows
    others = [o for o in (others or []) if o and str(o) != str(student_id)]
    if len(others) > MAX_COMPARED:
        raise BoomerangError(f"compare at most {MAX_COMPARED} other families at once, got {len(others)}")
    tables = published_families(table)
    if rows and (others or tables):
        rows = chart.combine({f"#{student_id}": rows, **{f"#{o}": result_rows(services, o) for o in others},
                              **{f"{n} (table)" if n.startswith("#") else n: r for n, r in tables.items()}})
    if not rows or not task or not metric:
        return None, [], None, "No results yet: evaluate a family from the Jobs tab.", None
    x_axis = x_axis or "parameters"
    if x_axis not in chart.X_AXES:
        raise BoomerangError(f"unknown x axis {x_axis!r}: one of {', '.join(chart.X_AXES)}")
    if chance:
        rows = chart.chance_normalised(rows)
    pts, off_axis = chart.on_axis(chart.points(rows, task, metric), rows, x_axis)
    try:
        best = best_within_budget(rows, task, metric, budget_kind, budget_value)
    except BoomerangError as exc:
        best, budget_value, refused = None, None, f"**Budget refused:** {exc}"
    else:
        refused = ""
    if per_task:
        fig = chart.panels(rows, metric, x_axis=x_axis, log_x=bool(log_x))
    else:
        fig = chart.figure(pts, task, metric, log_x=bool(log_x), highlight=best["key"] if best else None, x_axis=x_axis)
    xs = chart.x_of(rows, x_axis)
    beaten = chart.dominated_by(pts, metric not in chart.LOWER_IS_BETTER)

    def pareto_cell(r):  # for the charted task and metric only
        if r["task"] != task or r["metric"] != metric or r["key"] not in beaten:
            return ""
        return f"dominated by {beaten[r['key']]}" if beaten[r["key"]] else "frontier"

    table = [[r["key"], r["series"], r["n_layers"], r["params"], r["task"], r["metric"], round(r["value"], 5),
              "" if r["stderr"] is None else round(r["stderr"], 5), pareto_cell(r), r.get("train_tokens", ""),
              round(xs[r["key"]], 4) if r["key"] in xs else ""] for r in rows]
    path = Path(tempfile.mkdtemp(prefix="boomerang-results-")) / f"family-{student_id}.csv"
    with open(path, "w", newline="") as f:  # the table, and how each number was made
        writer = csv.writer(f)
        writer.writerow([*TABLE_HEADERS, *provenance.FIELDS])
        writer.writerows([*line, *provenance.columns(r).values()] for line, r in zip(table, rows, strict=True))
    message = refused
    if budget_value:
        message = (f"**Best within the budget:** {best['key']} ({best['n_layers']} layers, {best['params']:,} "
                   f"parameters): {metric} {best['value']:.4f}" if best else "**Nothing fits this budget.**")
    noise = chart.noise_note(pts)
    hidden = 0 if task == "average" else chart.one_measurement(rows, task, metric)[1]
    mixed = (f"{hidden} results of {task} measured with other settings (limit, held-out text, patch order or "
             f"ends) are left out of the chart." if hidden else "")
    gaps = chart.at_size_gaps(pts, metric)  # the paper's central comparison, for the charted task and metric
    at_size = ("**Interpolated sizes beside students distilled at the size** (more than 2 standard errors apart "
               "to count):\n" + "\n".join(f"- {chart.gap_line(g, metric)}" for g in gaps)) if gaps else ""
    split = budget.equal_budget(pts, metric)  # the family against students that split its budget
    equal = ("**At equal total budget** (the family's one run against students distilled at its sizes that split its "
             "training tokens between them):\n" + "\n".join(f"- {budget.budget_line(g, metric)}" for g in split)) if split else ""
    made = provenance.line(pts)
    axis_note = (f"{off_axis} models have no {x_axis} measured and are left out of the chart (the standard evaluation "
                 "measures cost: evaluate the family again)." if off_axis else "")
    chance_note = ("Accuracy chance-normalised: 0 is guessing (1 / choices, averaged over the items), 1 every item "
                   "right." if chance and metric in chart.CHANCE_METRICS else "")
    message = "\n\n".join(m for m in (message, chance_note, axis_note, noise, mixed, at_size, equal, made) if m)
    return fig, table, str(path), message, budget.figure(pts, task, metric) if split else None


# ----------------------------------------------------------------------------- item by item

ITEM_HEADERS = ["item", "right", "gold", "pick A", "pick B", "prompt (end)", "choices"]
SHOWN_ITEMS = 200


def item_choices(services, student_id, rows: list[dict] | None = None) -> tuple[list[str], list[str], str | None, str | None]:
    """(models with lm-eval tasks, smallest first; those tasks; default A: the family's middle size; default B: the
    teacher) for the two-model view."""
    rows = [r for r in (result_rows(services, student_id) if rows is None else rows) if r["task"] not in chart.NOT_AVERAGED]
    sizes = {r["key"]: (r["params"], r["key"]) for r in rows}
    models = sorted(sizes, key=sizes.__getitem__)
    family = [k for k in models if k.split("-")[0] in chart.FAMILY_SERIES]
    teacher = next((k for k in models if k.startswith("teacher-")), None)
    inner = [k for k in family if k != teacher]
    return models, sorted({r["task"] for r in rows}), (inner[len(inner) // 2] if inner else None), teacher


def item_panel(services, student_id, rows: list[dict], a=None, b=None, task=None, metric=None) -> tuple:
    """Updates of the item-by-item view (model A, model B, task, metric, summary, table) for a family's `rows`:
    the picks kept where the family still has them, else the defaults (`item_choices`)."""
    models, tasks, default_a, default_b = item_choices(services, student_id, rows) if student_id else ([], [], None, None)
    a = a if a in models else default_a
    b = b if b in models else default_b
    task = task if task in tasks else (tasks[0] if tasks else None)
    metric = metric or "acc"
    try:
        view = items_view(services, student_id, a, b, task, metric, rows=rows)
    except BoomerangError as exc:  # e.g. cells measured before items were kept
        view = (f"**Item by item:** {exc}", [])
    return (gr.update(choices=models, value=a), gr.update(choices=models, value=b),
            gr.update(choices=tasks, value=task), gr.update(value=metric), *view)


def items_view(services, student_id, a, b, task, metric, *, rows: list[dict] | None = None):
    """(summary markdown, the items A and B disagree on) for two models of a family on one task."""
    if not (student_id and a and b and task):
        return "Pick two models and a task.", []
    if a == b:
        return "Pick two different models.", []
    with Session(services.engine) as s:
        student = s.get(Student, int(student_id))
        folder = Path(student.folder) if student is not None else None
    if folder is None:
        raise BoomerangError(f"no family #{student_id}")
    rows = result_rows(services, student_id) if rows is None else rows
    cells = {}
    for key in (a, b):  # the cell the chart shows for this model and task (the last one recorded)
        mine = [r["cell"] for r in rows if r["key"] == key and r["task"] == task and r["metric"] == metric]
        if not mine:
            raise BoomerangError(f"{key} has no {task} {metric} result: evaluate it first")
        cells[key] = items.cell_of(folder / "eval", key, task, mine[-1])
    result = items.pair(items.read_items(cells[a]), items.read_items(cells[b]), metric)
    table = [[r["id"], f"only {a}" if r["right"] == "only_a" else f"only {b}", r["gold"], r["pick_a"], r["pick_b"],
              r["prompt"][-200:], " | ".join(c.strip() for c in r["choices"])]
             for r in result["rows"] if r["right"] in ("only_a", "only_b")]
    return f"**{task} {metric}, {a} (A) against {b} (B):** {items.summary(result, a, b)}", table[:SHOWN_ITEMS]


# ----------------------------------------------------------------------------- the tab

def tab(services):
    with gr.Row():
        family = gr.Dropdown(family_choices(services), label="Family", elem_id="compare-family", allow_custom_value=True)
        task = gr.Dropdown([], label="Task (or average)", elem_id="compare-task")
        metric = gr.Dropdown([], label="Metric", elem_id="compare-metric")
        x_axis = gr.Dropdown(list(chart.X_AXES), value="parameters", label="x axis", elem_id="compare-x")
        log_x = gr.Checkbox(False, label="Log x axis")
        chance = gr.Checkbox(False, label="Accuracy chance-normalised (0 = chance)", elem_id="compare-chance")
        per_task = gr.Checkbox(False, label="A panel per task", elem_id="compare-panels")
    with gr.Row():
        budget_kind = gr.Dropdown(list(chart.X_AXES), value="parameters", label="Fit my budget: at most this much of")
        budget = gr.Number(None, label="Budget")
        others = gr.Dropdown(family_choices(services), value=[], multiselect=True, label="Compare with",
                             elem_id="compare-others", info="other families of the same teacher (recipes, budgets, "
                             "checkpoints): one chart, one Pareto frontier")
        published = gr.File(None, file_types=[".csv"], type="filepath", label="…and a families.csv (boomerang compare)",
                            elem_id="compare-published", height=120)
    partial_md = gr.Markdown(elem_id="compare-note")
    budget_md = gr.Markdown(elem_id="budget-result")
    plot = gr.Plot(elem_id="compare-plot")
    budget_plot = gr.Plot(elem_id="budget-plot", label="At equal total budget")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False)
    csv_file = gr.File(label="Download CSV")
    with gr.Accordion("What a size loses, item by item", open=False, elem_id="items-view"):
        with gr.Row():
            item_a = gr.Dropdown([], label="Model A", elem_id="items-a")
            item_b = gr.Dropdown([], label="Model B", elem_id="items-b")
            item_task = gr.Dropdown([], label="Task", elem_id="items-task")
            item_metric = gr.Radio(["acc", "acc_norm"], value="acc", label="Right by")
        items_md = gr.Markdown(elem_id="items-summary")
        items_table = gr.Dataframe(headers=ITEM_HEADERS, interactive=False, elem_id="items-table")

    inputs = [family, task, metric, log_x, budget_kind, budget, others, published, x_axis, chance, per_task]
    outputs = [plot, table, csv_file, budget_md, budget_plot]

    # the chart follows the family's defaults at once, then every change the user makes
    def show_family(student_id, *rest):
        rows = result_rows(services, student_id) if student_id else []  # read once, passed down
        if student_id:
            tasks, metrics = task_metric_choices(services, student_id, rows)
            t, m = opening(services, student_id, rows)
            task_update, metric_update = gr.update(choices=tasks, value=t), gr.update(choices=metrics, value=m)
        else:
            t = m = None
            task_update, metric_update = gr.update(), gr.update()
        others_update = gr.update(choices=[c for c in family_choices(services) if c[1] != student_id])
        return (task_update, metric_update, others_update, *compare(services, student_id, t, m, *rest, rows=rows),
                len(rows), chart_notes(services, student_id, rows), *item_panel(services, student_id, rows))

    def tick(student_id, task_v, metric_v, n_seen, a, b, item_t, item_m, *rest):
        """fill_in, and the item view when rows have landed (the items of a task measured since)."""
        rows = result_rows(services, student_id) if student_id else []
        drawn = fill_in(services, student_id, task_v, metric_v, n_seen, *rest, rows=rows)
        if len(rows) == n_seen:
            return (*drawn, *(gr.skip() for _ in range(6)))
        return (*drawn, *item_panel(services, student_id, rows, a, b, item_t, item_m))

    seen = gr.State(0)  # rows charted: a tick redraws only when cells have landed since
    show = (show_family, [family, log_x, budget_kind, budget, others, published, x_axis, chance, per_task],
            [task, metric, others, *outputs, seen, partial_md, item_a, item_b, item_task, item_metric, items_md,
             items_table])

    timer = gr.Timer(10.0)
    item_controls = [item_a, item_b, item_task, item_metric]
    timer.tick(safe(tick), [family, task, metric, seen, *item_controls, log_x, budget_kind, budget, others, published,
                            x_axis, chance, per_task],
               [task, metric, *outputs, seen, partial_md, *item_controls, items_md, items_table], show_progress="hidden",
               api_name=False)
    family.input(safe(show[0]), *show[1:])
    for control in (task, metric, budget):
        control.input(bind(compare, services), inputs, outputs)
    for control in (log_x, budget_kind, published, x_axis, chance, per_task):
        control.change(bind(compare, services), inputs, outputs)
    others.input(bind(compare, services), inputs, outputs)
    for control in item_controls:
        control.input(bind(items_view, services), [family, item_a, item_b, item_task, item_metric],
                      [items_md, items_table])
    return family, show
