"""The Jobs tab: every job with its progress, one job's loss curves and log, and what can be done with it
(cancel, retry, a family from its last checkpoint, evaluate it, add the distilled-at-size baselines).

How a job's kind is worded (its unit, whether it has a token rate) comes from the job registry.
"""

from __future__ import annotations

import html

import gradio as gr
import plotly.graph_objects as go
from sqlmodel import Session

from app.common import bind, check_path, check_text, safe
from boomerang.errors import BoomerangError
from boomerang.evaluation.metrics import EvalSettings
from boomerang.evaluation.run import STANDARD_LIMIT, EvalRequest
from boomerang.evaluation.task_files import shipped_tasks
from boomerang.progress import format_eta
from boomerang.training.checkpoint import read_plan, snapshot, snapshots
from boomerang.training.recipe import DistillConfig
from boomerang.training.terms import is_mixed_step
from db import crud
from db.models import JobStatus
from workers.kinds import KINDS, progress_text
from workers.submit import requeue, submit
from workers.workflows import queue_at_size, register_family

JOB_COLUMNS = ["id", "kind", "status", "progress", "tokens/s", "ETA", "loss", "worker"]


def _eta(seconds) -> str:
    return format_eta(seconds, missing="")


def _progress_text(job) -> str:
    """What a job's progress counts: a phase before its first step, else its kind's unit (the registry's)."""
    if job.phase and job.phase != "training" and job.status == JobStatus.RUNNING:
        return html.escape(job.phase)
    return progress_text(job.kind, job.step, job.total, job.tokens_per_s)


def jobs_table(services) -> list[list]:
    with Session(services.engine) as s:
        jobs = crud.list_jobs(session=s, limit=200)
    return [[j.id, j.kind, j.status.value, f"{j.step}/{j.total}" if j.total else "-",
             round(j.tokens_per_s or 0) if j.kind in KINDS and KINDS[j.kind].rate else "", _eta(j.eta_s),
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
    status = (f"<div id='job-status' data-job='{job.id}' data-status='{job.status.value}'><b>Job {job.id}</b> ({job.kind}): "
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
    if job.kind != "distill" or not job.settings.get("mix_prob") or not job.run_dir:
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
    with Session(services.engine) as s:
        job = crud.request_cancel(session=s, job_id=int(job_id))
    return f"Job {job.id}: {job.status.value}" + (" — stopping within one step" if job.status == JobStatus.RUNNING else "")


def retry_job(services, job_id) -> str:
    job = requeue(engine=services.engine, app=services.celery, job_id=int(job_id))
    return f"Job {job.id} queued again; it resumes from its checkpoint."


def snapshot_job(services, job_id) -> str:
    """A running or stopped distillation's last checkpoint as a family of its own (a student row), to evaluate,
    compare and chat with before the run ends."""
    job = _job(services, job_id)
    if job is None or job.kind != "distill" or not job.run_dir:
        raise BoomerangError("pick a distillation job that has started")
    teacher = services.models.teacher(job.settings.get("teacher", "default"))
    folder = snapshot(job.run_dir, teacher=teacher)
    opened = services.models.opened(str(folder))
    st = register_family(services.engine, opened, job_id=job.id)
    step = opened.manifest.distilled["steps"]
    return (f"**Step {step} of {job.settings.get('steps', '?')} as family #{st.id}** (`{folder}`): chat with it or "
            f"compare it once evaluated (the Evaluate button takes this job's newest family).")


def at_size_job(services, job_id) -> str:
    """Queue the distilled-at-size baselines of a finished distillation: students of three sizes of its family,
    each distilled with the run's own recipe, data and budget (one distillation job each)."""
    job = _job(services, job_id)
    folder = (job.result or {}).get("student_dir") if job else None
    if not folder:
        raise BoomerangError("pick a SUCCEEDED distillation job")
    queued = queue_at_size(engine=services.engine, app=services.celery, student=folder, queue=services.queue)
    if not queued:
        return "Every distilled-at-size baseline of this run is done: press Evaluate to chart them."
    sizes = ", ".join(f"{len(c.keep)}" for c, _ in queued)
    return (f"**Queued jobs {', '.join(str(j.id) for _, j in queued)}**: students of {sizes} layers, each distilled with "
            f"this run's recipe, data and budget. Press Evaluate when they finish: they join the chart as 'distilled'.")


def evaluate_job(services, job_id, tasks: str, data_dir: str, limit, parts=1) -> str:
    """Queue an evaluation of the family a finished distillation job produced, shared out over `parts` jobs."""
    job = _job(services, job_id)
    folder = (job.result or {}).get("student_dir") if job else None
    if job is not None and not folder and job.run_dir:  # not finished: its newest checkpoint taken as a family
        taken = snapshots(job.run_dir)
        folder = str(taken[-1]) if taken else None
    if job is None or not folder:
        raise BoomerangError("pick a SUCCEEDED distillation job, or take a family from a running one's last "
                             "checkpoint first")
    check_text("tasks", tasks)
    if data_dir:
        check_path(services, "the evaluation data folder", data_dir)
    named = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    # the standard evaluation (shipped tasks, the run's held-out text, cost, both baselines) with what the form names
    request = EvalRequest.standard(folder, data_dir=data_dir or None,
                                   settings=EvalSettings(limit=int(limit) if limit else None),
                                   parts=1 if parts in (None, "") else int(parts), **({"tasks": named} if named else {}))
    new = submit(engine=services.engine, app=services.celery, kind="eval", settings=request.to_dict(),
                 queue=services.queue)
    shared = (f" It is shared out over {request.parts} jobs: the other free workers of the queue take the parts, and "
              "this job computes any part none takes, then gathers them." if request.parts > 1 else "")
    return f"**Evaluation job {new.id} queued.** Its results appear on the Compare tab.{shared}"



def _job(services, job_id):
    """The job row of an id from the page; None for none picked."""
    if not job_id:
        return None
    with Session(services.engine) as s:
        return crud.get_job(session=s, job_id=int(job_id))


def default_job(services) -> int | None:
    """The job the Jobs tab opens on when none is picked: the one running (the oldest, if several), else the newest."""
    with Session(services.engine) as s:
        listed = crud.list_jobs(session=s, limit=100)  # newest first
        running = [j.id for j in listed if j.status == JobStatus.RUNNING]
        return running[-1] if running else (listed[0].id if listed else None)


# ----------------------------------------------------------------------------- the tab

def tab(services):
    """The Jobs tab; returns its job field (the page opens the tab on `default_job` when the field is empty)."""
    table = gr.Dataframe(jobs_table(services), headers=JOB_COLUMNS, interactive=False, elem_id="jobs-table")
    with gr.Row():
        job_id = gr.Number(label="Job", precision=0, elem_id="job-id")
        cancel_btn = gr.Button("Cancel", elem_id="cancel-btn")
        retry_btn = gr.Button("Retry / resume", elem_id="retry-btn")
        snap_btn = gr.Button("Family from the last checkpoint", elem_id="snapshot-btn")
    status = gr.HTML(elem_id="job-detail")
    curves = gr.Plot(label="Loss terms", elem_id="loss-curves")
    log = gr.Textbox(label="Last log lines", lines=6, max_lines=12, elem_id="job-log")
    with gr.Accordion("Evaluate this family", open=False):
        with gr.Row():
            tasks = gr.Textbox(services.eval_tasks or ", ".join(shipped_tasks()), label="Tasks", elem_id="eval-tasks",
                               info="shipped with the project (offline), file stems in the data folder, or lm-eval names")
            data_dir = gr.Textbox(services.eval_data_dir or "", label="Evaluation data folder (optional)")
            limit = gr.Number(STANDARD_LIMIT, precision=0, label="Items per task")
            parts = gr.Number(1, precision=0, label="Workers", elem_id="eval-parts",
                              info="share it out over this many jobs, one per free worker of the queue")
        gr.Markdown("Also measured: perplexity, KL to the teacher and top-1 agreement on the run's held-out text "
                    "and on general text of another domain, memory and latency, and the undistilled and "
                    "layer-dropping baselines at every size.")
        with gr.Row():
            eval_btn = gr.Button("Evaluate", elem_id="eval-btn")
            at_size_btn = gr.Button("Add distilled-at-size baselines", elem_id="at-size-btn")
    action_md = gr.Markdown(elem_id="job-action")
    timer = gr.Timer(2.0)

    def refresh(jid):
        status_html, curve_rows, log_text = job_detail(services, jid)
        return jobs_table(services), status_html, loss_figure(curve_rows), log_text

    timer.tick(safe(refresh), job_id, [table, status, curves, log], show_progress="hidden", api_name=False)
    job_id.change(safe(refresh), job_id, [table, status, curves, log])

    def on_select(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else None

    table.select(on_select, None, job_id)
    cancel_btn.click(bind(cancel_job, services, refused="Cannot cancel"), job_id, action_md, api_name="cancel")
    retry_btn.click(bind(retry_job, services, refused="Cannot retry"), job_id, action_md)
    snap_btn.click(bind(snapshot_job, services, refused="No family"), job_id, action_md, api_name="snapshot")
    at_size_btn.click(bind(at_size_job, services, refused="Not queued"), job_id, action_md, api_name="at_size")
    eval_btn.click(bind(evaluate_job, services, refused="Not queued"), [job_id, tasks, data_dir, limit, parts],
                   action_md)
    return job_id
