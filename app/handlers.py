"""The dashboard's handlers: plain functions of (services, inputs) -> outputs, callable without a browser.

Errors a user can fix come back as messages for the page (never an exception to the browser), with
the library's own wording.
"""

from __future__ import annotations

import csv
import html
import math
import tempfile
from pathlib import Path

from sqlmodel import Session

from boomerang.errors import BoomerangError, excerpt
from db import crud
from db.models import JobStatus

# ----------------------------------------------------------------------------- launch


def teacher_choices(services) -> list[str]:
    with Session(services.engine) as s:
        used = [t.source for t in crud.list_teachers(session=s)]
    return ["default", *[u for u in used if u != "default"]]


MAX_TEXT = 4096
"""Characters a form's text field may hold (a path, a layer list, a task list); longer is refused unread."""
MAX_MESSAGE = 20_000
"""Characters of one chat message."""


def check_text(name: str, value, limit: int = MAX_TEXT) -> None:
    if isinstance(value, str) and len(value) > limit:
        raise BoomerangError(f"{name} is too long ({len(value):,} characters, at most {limit:,}): {excerpt(value, 40)}")


def check_path(services, what: str, path: str) -> None:
    """Refuse a server path outside the dashboard's allowed folders, before anything is looked up on disk."""
    check_text(what, path)
    if not services.path_allowed(path):
        roots = ", ".join(str(r) for r in services.roots())
        raise BoomerangError(f"{what} must be inside a folder this dashboard may read ({roots}); "
                             "start it with --allow-path DIR to add one")


def _teacher_path(teacher: str) -> bool:
    """Whether a teacher string names a local path (not the default, not a hub id such as org/name)."""
    import re

    return teacher != "default" and not re.fullmatch(r"[\w.-]+/[\w.-]+", teacher) or teacher.startswith((".", "/", "~"))


def _check_sources(services, teacher: str | None, data: str | None = None) -> None:
    if teacher and _teacher_path(teacher):
        check_path(services, "the teacher folder", teacher)
    if data and data != "teacher" and not data.startswith("hub:"):
        check_path(services, "the training data", data)


def _plan_settings(keep_first, every, keep_last, keep) -> dict:
    from boomerang.plan import parse_layer_list

    out = {"keep_first": int(keep_first), "every": int(every), "keep_last": int(keep_last)}
    if keep and str(keep).strip():
        out["keep"] = parse_layer_list(str(keep))
    return out


def patched_text(n: int) -> str:
    return f"{n} block{'' if n == 1 else 's'} patched"


def _loads_quickly(source: str) -> bool:
    """models.loads_quickly, with a source that cannot be loaded at all counted as not quick."""
    from boomerang.models import loads_quickly

    try:
        return loads_quickly(source)
    except BoomerangError:
        return False


def launch_estimate(services, teacher: str, data: str, steps, batch_size, seq_len, mix_prob, plan: str = "rule") -> str:
    """Roughly how long the form's job takes on this machine, from the rates earlier runs of the same teacher
    measured here (boomerang.training.timing); says so when none was measured."""
    from boomerang import data as d
    from boomerang.models import boomerang_home
    from boomerang.progress import format_eta
    from boomerang.training import timing
    from boomerang.training.recipe import DistillConfig

    source = (teacher or "default").strip()
    if not _loads_quickly(source):
        return ""
    try:
        _check_sources(services, source)
        fingerprint = services.models.teacher(source).fingerprint
        steps, tokens = int(steps), int(batch_size) * int(seq_len)
    except (BoomerangError, ValueError, TypeError):
        return ""  # the launch itself says what is wrong with the form
    docs = DistillConfig.teacher_docs
    writes = (data or "").strip() == "teacher" and not d.teacher_corpus_path(
        fingerprint, docs, DistillConfig.seed, boomerang_home() / "corpora").is_file()
    lines = []
    for device in ("cuda", "cpu"):
        est = timing.estimate(fingerprint, device, steps=steps, tokens_per_step=tokens, mixed=bool(float(mix_prob or 0)),
                              corpus_tokens=docs * d.TEACHER_DOC_TOKENS if writes else 0, importance=plan == "importance")
        if est:
            parts = ", ".join(f"{name} {format_eta(sec)}" for name, sec in est.parts.items())
            lines.append(f"**About {format_eta(est.seconds)} on {device}** ({parts}; from the rates a run of this "
                         f"teacher measured here, {est.measured_at}).")
    if not lines:
        return ("**Duration:** no run of this teacher has been timed on this machine yet; the quick-start job "
                "(`bash scripts/setup.sh`: 40 steps) measures it, and this line then says how long a job takes.")
    return " ".join(lines)


def preview_on_load(services, teacher: str, keep_first, every, keep_last, keep, plan: str = "rule") -> tuple[str, list[list]]:
    """The preview the page shows when it opens, unless that would convert or download the teacher first
    (then the page says so and the button does it)."""
    source = (teacher or "default").strip()
    if not _loads_quickly(source):
        return (f"Press **Preview the family** to see the plan and every size of `{source}` (it is loaded first: "
                f"converted or downloaded once).", [])
    return preview_plan(services, teacher, keep_first, every, keep_last, keep, plan)


def preview_plan(services, teacher: str, keep_first, every, keep_last, keep, plan: str = "rule") -> tuple[str, list[list]]:
    """What the student keeps and every size the family will have; an error message otherwise.

    With plan=importance the kept layers are measured when the job starts (on its first training blocks):
    the preview says so and shows the rule's plan as the size it will have, not as the layers it will keep."""
    from boomerang.family import Family
    from boomerang.student import cut_student
    from boomerang.training.recipe import DistillConfig

    try:
        check_text("the layer list", keep)
        _check_sources(services, (teacher or "default").strip())
        cfg = DistillConfig(teacher=teacher or "default", plan=plan or "rule",
                            **_plan_settings(keep_first, every, keep_last, keep))
        t = services.models.teacher(cfg.teacher)
        plan = cfg.plan_for(t.n_layers)
        fam = Family(t.model, cut_student(t.model, plan, share=True), plan)
    except BoomerangError as exc:
        return f"**Cannot use this plan:** {exc}", []
    sizes = fam.sizes()
    text = (f"Teacher **{t.source}**: {plan.n_teacher} layers, {sizes[-1].params:,} parameters. "
            f"The student keeps teacher layers `{list(plan.kept)}`: **{plan.n_student} layers, "
            f"{sizes[0].params:,} parameters**. The family has {len(sizes)} sizes.")
    if cfg.plan == "importance" and not cfg.keep:
        text = (f"Teacher **{t.source}**: {plan.n_teacher} layers, {sizes[-1].params:,} parameters. **Importance "
                f"plan:** the job keeps {plan.n_student} layers (about {sizes[0].params:,} parameters), chosen when it "
                f"starts as the layers whose loss costs the teacher most on its first training blocks; which ones, "
                f"and so which sizes the family has, is known then (the rule's plan below shows the size, not the "
                f"layers).")
    rows = [[s.n_layers, f"{s.params / 1e6:.1f}M", f"{s.params_no_embed / 1e6:.1f}M",
             "teacher" if s.is_teacher else "student" if s.is_student else patched_text(len(s.patched))]
            for s in sizes]
    return text, rows


LAUNCH_FIELDS = ("teacher", "keep_first", "every", "keep_last", "keep", "plan", "data", "steps", "batch_size", "seq_len",
                 "lr", "warmup", "ce_weight", "kl_weight", "cosine_weight", "mse_weight", "local_weight", "mix_prob",
                 "freeze_embeddings", "freeze_head", "freeze_single_blocks", "processes", "fsdp", "evaluate")
"""The DistillConfig fields the launch form shows (the form is built from their types, defaults and docs)."""


def form_values(recipe: str) -> dict:
    """The launch form's values for a named recipe: every field it shows, as the recipe sets it."""
    from boomerang.training.recipe import DistillConfig, named_recipe

    cfg = DistillConfig.from_dict(named_recipe(recipe))
    values = {name: getattr(cfg, name) for name in LAUNCH_FIELDS}
    values["keep"] = ",".join(map(str, cfg.keep)) if cfg.keep else ""
    values["evaluate"] = True  # from the dashboard, a family is evaluated once saved unless unticked
    return values


def recipe_summary(recipe: str) -> str:
    """What the chosen recipe is, in one paragraph, with its values (not the paper's when it is another)."""
    from boomerang.training.recipe import DistillConfig, named_recipe

    cfg = DistillConfig.from_dict(named_recipe(recipe))
    terms = ", ".join(f"{name.removesuffix('_weight')} {getattr(cfg, name):g}" for name in cfg.loss_weights()
                      if getattr(cfg, name))
    head = {"paper": "Paper defaults (Kangaslahti et al., 2026)",
            "cpu": "The CPU recipe (docs/distillation.md, try 7)"}.get(recipe, f"Recipe {recipe}")
    frozen = [name.removeprefix("freeze_") for name in ("freeze_embeddings", "freeze_head", "freeze_single_blocks")
              if getattr(cfg, name)]
    return (f"**Settings** — {head}: AdamW lr {cfg.lr:g}, betas ({cfg.beta1:g}, {cfg.beta2:g}), wd {cfg.weight_decay:g}, "
            f"warm-up {cfg.warmup:.0%}, {cfg.schedule} schedule; loss terms {terms}; plan {cfg.plan}"
            + (f"; mixed sizes {cfg.mix_prob:.0%} of batches" if cfg.mix_prob else "")
            + (f"; frozen: {', '.join(frozen)}" if frozen else "") + ".")


def _form_settings(form: dict) -> dict:
    """Form values as DistillConfig settings: numbers typed by their fields, the keep list parsed, blanks dropped."""
    import dataclasses
    import typing

    from boomerang.plan import parse_layer_list
    from boomerang.training.recipe import DistillConfig

    hints = typing.get_type_hints(DistillConfig)
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    out = {}
    for name, value in form.items():
        check_text(name, value)
        if name not in names or value is None or (isinstance(value, str) and not value.strip()):
            continue
        kind = hints[name]
        if name == "keep":
            value = parse_layer_list(str(value))
        elif kind is int:
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is bool:
            value = bool(value)
        elif isinstance(value, str):
            value = value.strip()
        out[name] = value
    return out


def launch_job(services, form: dict) -> str:
    """Queue a distillation from the launch form: `form` holds "recipe" and any DistillConfig fields by name.

    The recipe's settings come first, the form's values over them; the message says which job, or what to fix.
    """
    from boomerang.training.recipe import named_recipe
    from workers.submit import submit

    try:
        for name in ("teacher", "data"):
            check_text(name, form.get(name))
        _check_sources(services, str(form.get("teacher") or "default").strip(), str(form.get("data") or "").strip())
        settings = {**named_recipe(form.get("recipe") or "paper"), **_form_settings(form)}
        settings.setdefault("teacher", "default")
        job = submit(engine=services.engine, app=services.celery, kind="distill", settings=settings, queue=services.queue)
    except (BoomerangError, ValueError, TypeError) as exc:
        return f"**Not launched:** {exc}"
    return f"**Job {job.id} queued.** Follow it on the Jobs tab."


# ----------------------------------------------------------------------------- jobs

JOB_COLUMNS = ["id", "kind", "status", "progress", "tokens/s", "ETA", "loss", "worker"]


def _eta(seconds) -> str:
    from boomerang.progress import format_eta

    return format_eta(seconds, missing="")


def _progress_text(job) -> str:
    """What a job's progress counts: a phase before training, training steps and their rate, evaluation cells."""
    if job.phase and job.phase != "training" and job.status == JobStatus.RUNNING:
        return html.escape(job.phase)
    if job.kind.value == "distill":
        return f"step {job.step}/{job.total} · {round(job.tokens_per_s or 0)} tokens/s"
    return f"cell {job.step}/{job.total}" if job.total else "waiting"


def jobs_table(services) -> list[list]:
    with Session(services.engine) as s:
        jobs = crud.list_jobs(session=s, limit=200)
    return [[j.id, j.kind.value, j.status.value, f"{j.step}/{j.total}" if j.total else "-",
             round(j.tokens_per_s or 0) if j.kind.value == "distill" else "", _eta(j.eta_s),
             round(j.losses["loss"], 4) if j.losses.get("loss") is not None else "", j.worker or ""] for j in jobs]


def job_detail(services, job_id) -> tuple[str, list[dict], str]:
    """(status and progress HTML, loss-curve rows, last log lines) of one job."""
    if not job_id:
        return "Pick a job in the table.", [], ""
    with Session(services.engine) as s:
        job = crud.get_job(session=s, job_id=int(job_id))
        if job is None:
            return f"No job {job_id}.", [], ""
        steps = crud.steps_of(session=s, job_id=job.id)
    frac = job.step / job.total if job.total else (1.0 if job.status == JobStatus.SUCCEEDED else 0.0)
    color = {"SUCCEEDED": "#2ca02c", "FAILED": "#d62728", "CANCELLED": "#7f7f7f"}.get(job.status.value, "#1f77b4")
    extra = ""
    if job.error:
        extra = f"<div class='job-error'>{html.escape(job.error)}</div>"
    elif job.result.get("student_dir"):
        extra = f"<div>student: <code>{html.escape(job.result['student_dir'])}</code></div>"
    status = (f"<div id='job-status' data-job='{job.id}' data-status='{job.status.value}'><b>Job {job.id}</b> ({job.kind.value}): "
              f"<b>{job.status.value}</b> · {_progress_text(job)} · "
              f"ETA {_eta(job.eta_s) or '-'}</div>"
              f"<div style='background:#eee;border-radius:4px;height:14px;margin:6px 0'>"
              f"<div style='width:{frac * 100:.1f}%;background:{color};height:14px;border-radius:4px'></div></div>{extra}")
    mixed = _mixed_steps(job, [m.step for m in steps])
    curves = [{"step": m.step, "loss": value, "term": term, "mixed": m.step in mixed} for m in steps
              for term, value in (("total", m.loss), *m.terms.items())]
    return status, curves, job.log


def _mixed_steps(job, steps: list[int]) -> set[int]:
    """The steps of a distillation job that trained a mixed size (none when its recipe mixes none)."""
    from boomerang.training.checkpoint import read_plan
    from boomerang.training.loop import is_mixed_step
    from boomerang.training.recipe import DistillConfig

    if job.kind.value != "distill" or not job.settings.get("mix_prob") or not job.run_dir:
        return set()
    try:
        cfg = DistillConfig.from_dict(job.settings)
        plan = read_plan(job.run_dir)
    except (OSError, ValueError, KeyError, BoomerangError):  # no plan yet (or a moved run): one series
        return set()
    return {step for step in steps if is_mixed_step(cfg, plan, step)}


LOSS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def loss_figure(curves: list[dict]):
    """Plotly figure of the loss terms over steps (None when there is nothing to draw yet).

    A recipe that trains a random mixed size on some steps (mix_prob) has two kinds of step whose losses
    differ in scale: each term is drawn as two series, student steps (solid) and mixed-size steps
    (dotted), so the progress of each is visible instead of a jagged line between them."""
    if not curves:
        return None
    import plotly.graph_objects as go

    fig = go.Figure()
    any_mixed = any(c.get("mixed") for c in curves)
    for i, term in enumerate(dict.fromkeys(c["term"] for c in curves)):  # total first, then the recipe's terms
        color = LOSS_COLORS[i % len(LOSS_COLORS)]
        for mixed in ((False, True) if any_mixed else (False,)):
            pts = [c for c in curves if c["term"] == term and bool(c.get("mixed")) == mixed]
            if not pts:
                continue
            name = f"{term} (mixed sizes)" if mixed else f"{term} (student)" if any_mixed else term
            fig.add_trace(go.Scatter(x=[c["step"] for c in pts], y=[c["loss"] for c in pts], name=name, mode="lines",
                                     legendgroup=term, line={"color": color, "dash": "dot" if mixed else "solid"}))
    fig.update_layout(height=280, margin={"l": 40, "r": 10, "t": 30, "b": 30}, template="plotly_white",
                      xaxis_title="step", yaxis_title="loss", title="Loss terms")
    return fig


def cancel_job(services, job_id) -> str:
    try:
        with Session(services.engine) as s:
            job = crud.request_cancel(session=s, job_id=int(job_id))
    except (LookupError, ValueError, TypeError) as exc:
        return f"**Cannot cancel:** {exc}"
    return f"Job {job.id}: {job.status.value}" + (" — stopping within one step" if job.status == JobStatus.RUNNING else "")


def retry_job(services, job_id) -> str:
    from workers.submit import requeue

    try:
        job = requeue(engine=services.engine, app=services.celery, job_id=int(job_id))
    except (LookupError, ValueError, TypeError, BoomerangError) as exc:
        return f"**Cannot retry:** {exc}"
    return f"Job {job.id} queued again; it resumes from its checkpoint."


def snapshot_job(services, job_id) -> str:
    """A running or stopped distillation's last checkpoint as a family of its own (a student row), to evaluate,
    compare and chat with before the run ends."""
    from boomerang.training.checkpoint import snapshot

    with Session(services.engine) as s:
        job = crud.get_job(session=s, job_id=int(job_id)) if job_id else None
    if job is None or job.kind.value != "distill" or not job.run_dir:
        return "**No family:** pick a distillation job that has started."
    try:
        teacher = services.models.teacher(job.settings.get("teacher", "default"))
        folder = snapshot(job.run_dir, teacher=teacher)
        opened = services.models.opened(str(folder))
        sizes = [z.to_dict() for z in opened.family.sizes()]
        with Session(services.engine) as s:
            t = crud.get_or_create_teacher(session=s, source=teacher.source, fingerprint=teacher.fingerprint,
                                           n_layers=teacher.n_layers)
            st = crud.upsert_student(session=s, folder=str(opened.folder), manifest=opened.manifest.to_dict(),
                                     sizes=sizes, job_id=job.id, teacher_id=t.id)
    except BoomerangError as exc:
        return f"**No family:** {exc}"
    step = opened.manifest.distilled["steps"]
    return (f"**Step {step} of {job.settings.get('steps', '?')} as family #{st.id}** (`{folder}`): chat with it or "
            f"compare it once evaluated (the Evaluate button takes this job's newest family).")


def queue_at_size(services, job_id) -> str:
    """Queue the distilled-at-size baselines of a finished distillation: students of three sizes of its family,
    each distilled with the run's own recipe, data and budget (one distillation job each)."""
    from boomerang.training.at_size import at_size_configs, is_done
    from workers.submit import submit

    with Session(services.engine) as s:
        job = crud.get_job(session=s, job_id=int(job_id)) if job_id else None
    folder = (job.result or {}).get("student_dir") if job else None
    if not folder:
        return "**Cannot add baselines:** pick a SUCCEEDED distillation job."
    try:
        configs = [c for c in at_size_configs(folder) if not is_done(c)]
        queued = [submit(engine=services.engine, app=services.celery, kind="distill", settings=c.to_dict(),
                         queue=services.queue) for c in configs]
    except (BoomerangError, ValueError) as exc:
        return f"**Not queued:** {exc}"
    if not queued:
        return "Every distilled-at-size baseline of this run is done: press Evaluate to chart them."
    sizes = ", ".join(f"{len(c.keep)}" for c in configs)
    return (f"**Queued jobs {', '.join(str(j.id) for j in queued)}**: students of {sizes} layers, each distilled with "
            f"this run's recipe, data and budget. Press Evaluate when they finish: they join the chart as 'distilled'.")


def evaluate_job(services, job_id, tasks: str, data_dir: str, limit) -> str:
    """Queue an evaluation of the family a finished distillation job produced."""
    from workers.submit import submit

    with Session(services.engine) as s:
        job = crud.get_job(session=s, job_id=int(job_id)) if job_id else None
    folder = (job.result or {}).get("student_dir") if job else None
    if job is not None and not folder and job.run_dir:  # not finished: its newest checkpoint taken as a family
        from boomerang.training.checkpoint import snapshots

        taken = snapshots(job.run_dir)
        folder = str(taken[-1]) if taken else None
    if job is None or not folder:
        return ("**Cannot evaluate:** pick a SUCCEEDED distillation job, or take a family from a running one's last "
                "checkpoint first.")
    try:
        check_text("tasks", tasks)
        if data_dir:
            check_path(services, "the evaluation data folder", data_dir)
        from boomerang.evaluation.metrics import EvalSettings
        from boomerang.evaluation.run import EvalRequest

        named = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        # the standard evaluation (shipped tasks, the run's held-out text, cost, both baselines) with what the form names
        request = EvalRequest.standard(folder, data_dir=data_dir or None,
                                       settings=EvalSettings(limit=int(limit) if limit else None),
                                       **({"tasks": named} if named else {}))
        new = submit(engine=services.engine, app=services.celery, kind="eval", settings=request.to_dict(),
                     queue=services.queue)
    except (BoomerangError, ValueError) as exc:
        return f"**Not queued:** {exc}"
    return f"**Evaluation job {new.id} queued.** Its results appear on the Compare tab."


# ----------------------------------------------------------------------------- compare


def family_choices(services) -> list[tuple[str, str]]:
    with Session(services.engine) as s:
        students = crud.list_students(session=s)
    return [(f"#{st.id} {Path(st.folder).parent.name}/{Path(st.folder).name} "
             f"({st.manifest.get('teacher', {}).get('source', '?')})", str(st.id)) for st in students]


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


def task_metric_choices(services, student_id) -> tuple[list[str], list[str]]:
    from boomerang.evaluation import chart

    rows = result_rows(services, student_id)
    tasks = sorted({r["task"] for r in rows})
    lm_tasks = [t for t in tasks if t not in chart.NOT_AVERAGED]
    return (["average"] if len(lm_tasks) > 1 else []) + tasks, sorted({r["metric"] for r in rows})


def best_within_budget(rows: list[dict], task: str, metric: str, budget_kind: str, budget) -> dict | None:
    """The best-scoring model that fits: parameters, memory (MB of weights) or latency (prefill ms)."""
    from boomerang.evaluation.chart import LOWER_IS_BETTER, points

    if not budget:
        return None
    if not math.isfinite(float(budget)) or float(budget) < 0:
        raise BoomerangError(f"the budget must be a finite number of 0 or more, got {budget}")
    pts = points(rows, task, metric)
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
    lower = metric in LOWER_IS_BETTER
    return min(fits, key=lambda p: p["value"]) if lower else max(fits, key=lambda p: p["value"])


MAX_COMPARED = 8
MAX_TABLE_BYTES = 20 * 2**20
"""Size of a published families.csv the Compare tab reads (the fidelity study's is 0.1 MB)."""


def published_families(path) -> dict[str, list[dict]]:
    """The families of a `families.csv` a user uploaded (written by `boomerang compare`: a published study, or
    a run whose folders are on another machine), as result rows; {} when none is given."""
    from boomerang.evaluation.compare import published

    if not path:
        return {}
    path = Path(path)  # the Compare tab's gr.File(type="filepath") gives a path
    if path.suffix.lower() != ".csv":
        raise BoomerangError(f"a published table is a families.csv written by boomerang compare, got {path.name}")
    if path.is_file() and path.stat().st_size > MAX_TABLE_BYTES:
        raise BoomerangError(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB: a families.csv of at most "
                             f"{MAX_TABLE_BYTES // 2**20} MB is read")
    families = published(str(path))
    if len(families) > MAX_COMPARED:
        raise BoomerangError(f"compare at most {MAX_COMPARED} other families at once: {path.name} has {len(families)}")
    return families


def compare(services, student_id, task, metric, log_x, budget_kind, budget, others=None, table=None):
    """(plotly figure, table rows, CSV path, budget message) for one family, task and metric; with `others` (family
    ids), their rows too on the same chart under one Pareto frontier (keys "#ID:model"); with `table` (a
    `families.csv` of `boomerang compare`), its families too (keys "NAME:model")."""
    from boomerang.evaluation import chart

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


# ----------------------------------------------------------------------------- chat


CUT = "cut:"
"""A chat family value "cut:SOURCE": the teacher's undistilled family, chattable before any distillation."""


def loads_at_once(family_id: str) -> bool:
    """Whether opening a family needs no conversion or download first (a distilled one always qualifies:
    its teacher was loaded to distill it)."""
    return not str(family_id).startswith(CUT) or _loads_quickly(str(family_id)[len(CUT):])


def chat_family_choices(services) -> list[tuple[str, str]]:
    """The distilled families, then each known teacher's undistilled family (labelled so)."""
    cut = [(f"{t}: undistilled sizes (the teacher's layers dropped, no training)", f"{CUT}{t}")
           for t in teacher_choices(services)]
    return family_choices(services) + cut


def _family(services, family_id, ends: str = "student"):
    """(teacher, family, distilled) for a chat family value; None when none is picked. `ends`: see
    `boomerang.family.ENDS` (an undistilled family's ends are the teacher's either way)."""
    if not family_id:
        return None
    if str(family_id).startswith(CUT):
        source = str(family_id)[len(CUT):]
        _check_sources(services, source)
        teacher, fam = services.models.cut_family(source)
        return teacher, fam, False
    folder = _student_folder(services, family_id)
    if folder is None:
        return None
    from boomerang.family import check_ends

    teacher, fam = services.models.family(folder, ends=check_ends(ends or "student"))
    return teacher, fam, True


def size_choices(services, student_id) -> tuple[list[int], int] | None:
    """(the sizes the family has, the one picked first: the middle one) for a family; None without one."""
    picked = _family(services, student_id)
    if picked is None:
        return None
    counts = picked[1].layer_counts
    return counts, counts[len(counts) // 2]


def size_label(services, student_id, n_layers, ends: str = "student") -> str:
    picked = _family(services, student_id, ends)
    if picked is None or not n_layers:
        return ""
    _, fam, distilled = picked
    try:
        info = fam.info(int(n_layers))
    except BoomerangError as exc:
        return str(exc)
    kind = "the teacher" if info.is_teacher else "the student" if info.is_student else patched_text(len(info.patched))
    if distilled and not (info.is_teacher or info.is_student) and fam.ends != "student":
        embeddings, head = fam.ends_for(info.patched)
        kind += f" · embeddings from the {embeddings}, norm and head from the {head}"
    if not distilled and not info.is_teacher:
        kind += " · undistilled: the teacher with layers dropped, not trained"
    return f"**{info.n_layers} layers** · {info.params / 1e6:.1f}M parameters · {kind}"


def _student_folder(services, student_id) -> str | None:
    if not student_id or not str(student_id).isdigit():  # none picked, or an undistilled family ("cut:...")
        return None
    with Session(services.engine) as s:
        from db.models import Student

        st = s.get(Student, int(student_id))
    return st.folder if st else None


def _messages(history: list[dict], system: str, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        msgs.append({"role": m["role"], "content": content})
    return msgs + [{"role": "user", "content": user}]


def chat_turn(services, student_id, n_layers, message: str, left: list, right: list, system: str,
              temperature, top_p, max_new_tokens, stop: str = "api", ends: str = "student"):
    """Stream one turn to a size (left) and the teacher (right) at once; yields (left, right, left stats, right stats)."""
    from boomerang.generation import Sampling, stream_pair

    picked = _family(services, student_id, ends)
    if picked is None or not message or not message.strip():
        yield left, right, "Pick a family and type a message.", ""
        return
    check_text("the message", message, MAX_MESSAGE)
    check_text("the system prompt", system, MAX_MESSAGE)
    teacher, fam, _ = picked
    size = fam.build(int(n_layers))
    stop = services.stop_event(stop)  # the session's token: Stop sets the same event
    stop.clear()
    sides = [(size, _messages(left, system, message)), (fam.teacher, _messages(right, system, message))]
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p))  # checked before any work
    base_l = left + [{"role": "user", "content": message}]
    base_r = right + [{"role": "user", "content": message}]
    for a, b in stream_pair(sides, teacher.tokenizer, sampling, stop):
        yield (base_l + [{"role": "assistant", "content": a.text}], base_r + [{"role": "assistant", "content": b.text}],
               f"{n_layers} layers: {a.stats()}", f"teacher: {b.stats()}")


def export_chosen(services, student_id, n_layers, ends: str = "student") -> str:
    from boomerang.export import export_size
    from boomerang.family import check_ends

    folder = _student_folder(services, student_id)
    if folder is None:
        return ("**Pick a distilled family first.**" if not str(student_id or "").startswith(CUT) else
                "**Nothing to export:** the sizes of an undistilled family are the teacher with layers dropped.")
    ends = check_ends(ends or "student")
    opened = services.models.opened(folder, ends=ends)
    out = Path(services.exports_dir) / f"student-{student_id}-{int(n_layers)}L{'' if ends == 'student' else '-' + ends + '-ends'}"
    try:
        Path(services.exports_dir).mkdir(parents=True, exist_ok=True)
        path = export_size(opened.family, int(n_layers), out, tokenizer=opened.teacher.tokenizer,
                           teacher_source=opened.teacher.source, student_source=folder, overwrite=out.exists(),
                           distilled=opened.manifest.distilled is not None)
    except BoomerangError as exc:
        return f"**Not exported:** {exc}"
    return f"Exported the {int(n_layers)}-layer size to `{path}` (loads with plain transformers)."


def serving_snippet(services, student_id, n_layers) -> str:
    """How to call this size from code: the running server's URL and a snippet, or the command that starts one."""
    from boomerang.servers import running_servers

    folder = _student_folder(services, student_id)
    if folder is None or not n_layers:
        return ""
    folder = str(Path(folder).expanduser().resolve())
    server = next((s for s in running_servers() if s.get("student") == folder), None)
    if server is None:
        return (f"Call every size of this family from your own code through the OpenAI API: "
                f"`boomerang serve --student {folder}` (docs/serving.md).")
    model = server["sizes"].get(str(int(n_layers)))
    if model is None:
        return f"The server at `{server['url']}` has no {int(n_layers)}-layer size."
    key = "$BOOMERANG_API_KEY" if server.get("auth") else "none"
    header = ' -H "Authorization: Bearer $BOOMERANG_API_KEY"' if server.get("auth") else ""
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    return (f"**Served** at `{server['url']}` as `{model}` (and every other size of the family):\n\n"
            f"```bash\ncurl {server['url']}/chat/completions -H 'Content-Type: application/json'{header} -d '{body}'\n```\n\n"
            f"```python\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=\"{server['url']}\", api_key=\"{key}\")\n"
            f"reply = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])\n"
            f"print(reply.choices[0].message.content)\n```")

