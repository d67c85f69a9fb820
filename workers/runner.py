"""Running one job: claim it, beat a heartbeat, call the library, record progress, finish it.

How a job of many hours is neither run twice nor lost:
- *Not twice.* Before running, a worker claims the job in the database in one UPDATE that succeeds
  only for a QUEUED job or a RUNNING one whose heartbeat is stale. A second delivery of the same
  message (Redis' visibility timeout, a requeue) finds the job held and is dropped.
- *Not lost.* While a job runs, a thread refreshes its heartbeat every few seconds. Every worker
  sweeps for RUNNING jobs whose heartbeat is older than `stale_after`: their worker died; they go
  back to QUEUED with a new message, and the next free worker resumes them from their checkpoint.
- A worker that loses its claim (swept while alive but stalled) stops its run at the next step.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
import traceback
from pathlib import Path

from sqlmodel import Session

from boomerang.errors import BoomerangError
from db import crud
from db.engine import make_engine
from db.models import JobKind, JobStatus

HEARTBEAT_S = float(os.environ.get("BOOMERANG_HEARTBEAT_S", "5"))
STALE_AFTER_S = float(os.environ.get("BOOMERANG_STALE_AFTER_S", "60"))
PROGRESS_EVERY_S = 2.0
LOG_LINES = 20


def worker_name() -> str:
    return os.environ.get("BOOMERANG_WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat(threading.Thread):
    """Refreshes a job's heartbeat; notices when the job is no longer ours."""

    def __init__(self, engine, job_id: int, worker: str, every: float = HEARTBEAT_S):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.engine, self.job_id, self.worker, self.every = engine, job_id, worker, every
        self.done, self.lost = threading.Event(), False

    def run(self) -> None:
        while not self.done.wait(self.every):
            with Session(self.engine) as s:
                if not crud.heartbeat(session=s, job_id=self.job_id, worker=self.worker):
                    self.lost = True
                    return


class Cancelled(Exception):
    pass


class JobContext:
    """What a job body gets: progress reporting, the stop flag, and the job row's settings."""

    def __init__(self, engine, job, beat: Heartbeat):
        self.engine, self.job, self.beat = engine, job, beat
        self._checked, self._cancel = 0.0, False
        self._pending, self._flushed, self._log = [], 0.0, []

    def should_stop(self) -> bool:
        if self.beat.lost:
            return True
        now = time.monotonic()
        if now - self._checked > 1.0:
            with Session(self.engine) as s:
                self._cancel = bool(crud.get_job(session=s, job_id=self.job.id).cancel_requested)
            self._checked = now
        return self._cancel

    def log(self, line: str) -> None:
        self._log = (self._log + [line])[-LOG_LINES:]

    def progress(self, step: int, total: int, *, steps: list[dict] | None = None, force: bool = False, **fields) -> None:
        """Buffer step metrics; write progress to the database at least every PROGRESS_EVERY_S."""
        self._pending += steps or []
        now = time.monotonic()
        if not force and now - self._flushed < PROGRESS_EVERY_S:
            return
        with Session(self.engine) as s:
            if self._pending:
                crud.record_steps(session=s, job_id=self.job.id, steps=self._pending)
            crud.update_progress(session=s, job_id=self.job.id, step=step, total=total, log="\n".join(self._log), **fields)
        self._pending, self._flushed = [], now


def run_job(job_id: int, *, expected_kind: str | None = None, engine=None, worker: str | None = None,
            stale_after: float = STALE_AFTER_S) -> str:
    """Claim and run a job to its end; returns the final status, or "skipped" if another worker holds it."""
    engine = engine or make_engine()
    worker = worker or worker_name()
    with Session(engine) as s:
        if not crud.claim_job(session=s, job_id=job_id, worker=worker, stale_after=dt.timedelta(seconds=stale_after)):
            return "skipped"
        job = crud.get_job(session=s, job_id=job_id)
    if expected_kind and job.kind.value != expected_kind:
        _finish(engine, job_id, JobStatus.FAILED, f"job {job_id} is a {job.kind.value} job, sent to the {expected_kind} task")
        return JobStatus.FAILED.value
    beat = Heartbeat(engine, job_id, worker)
    beat.start()
    ctx = JobContext(engine, job, beat)
    try:
        result = BODIES[job.kind](ctx)
        if beat.lost:
            return "lost"  # another worker took the job over; it will finish it
        _finish(engine, job_id, JobStatus.SUCCEEDED, result=result)
        return JobStatus.SUCCEEDED.value
    except Cancelled:
        _finish(engine, job_id, JobStatus.CANCELLED)
        return JobStatus.CANCELLED.value
    except Exception as exc:  # a failing job must never take the worker down
        ctx.log(traceback.format_exc(limit=5))
        ctx.progress(job.step, job.total, force=True)
        _finish(engine, job_id, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        return JobStatus.FAILED.value
    finally:
        beat.done.set()


def _finish(engine, job_id: int, status: JobStatus, error: str | None = None, result: dict | None = None) -> None:
    with Session(engine) as s:
        crud.finish_job(session=s, job_id=job_id, status=status, error=error, result=result)


# ----------------------------------------------------------------------------- job bodies


def run_dir_for(job) -> Path:
    from boomerang.models import boomerang_home

    return Path(job.settings.get("out") or boomerang_home() / "runs" / f"job-{job.id}").expanduser().resolve()


def _distill(ctx: JobContext) -> dict:
    from boomerang.distill import CHECKPOINT, DistillConfig, distill
    from boomerang.models import load_teacher

    job = ctx.job
    out = run_dir_for(job)
    cfg = DistillConfig.from_dict({**job.settings, "out": str(out)})
    resume = (out / CHECKPOINT).is_file()
    with Session(ctx.engine) as s:
        crud.update_progress(session=s, job_id=job.id, run_dir=str(out), total=cfg.steps)
    where = f"{cfg.processes} processes" if cfg.processes > 1 else "one process"
    ctx.log(f"{'resuming' if resume else 'starting'} on {worker_name()} ({where}): {cfg.steps} steps into {out}")
    first = {"seen": False, "step": 0}

    def on_step(r) -> None:
        if not first["seen"]:
            first["seen"], first["step"] = True, r.step
            with Session(ctx.engine) as s:  # steps past the checkpoint are logged again: drop the old ones
                crud.forget_steps_after(session=s, job_id=job.id, step=r.step - 1)
        ctx.log(f"step {r.step}/{r.total} loss {r.loss:.4f} ce {r.ce:.4f} kl {r.kl:.4f} cos {r.cosine:.4f}")
        ctx.progress(r.step, r.total, steps=[r.to_dict()], force=r.step == r.total,
                     losses={"loss": r.loss, "ce": r.ce, "kl": r.kl, "cosine": r.cosine, "mse": r.mse,
                             "local": r.local},
                     tokens_per_s=r.tokens_per_s, eta_s=r.eta_s)

    if cfg.processes > 1:
        steps_done, stopped, student_dir = _distill_processes(ctx, cfg, resume, on_step)
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype)
    else:
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype)
        result = distill(cfg, on_step=on_step, should_stop=ctx.should_stop, resume=resume, teacher=teacher)
        steps_done, stopped, student_dir = result.steps_done, result.stopped, result.student_dir
    ctx.progress(steps_done, cfg.steps, force=True)
    if stopped:
        raise Cancelled
    _register_student(ctx, teacher, student_dir)
    return {"student_dir": str(student_dir), "steps": steps_done,
            "resumed_from": first["step"] - 1 if first["seen"] else steps_done}


def _distill_processes(ctx: JobContext, cfg, resume: bool, on_step) -> tuple[int, bool, Path | None]:
    """One job on several processes (GPUs): torchrun in a child, its steps read back from metrics.jsonl.

    Cancelling creates the stop file the processes watch: they finish the step and checkpoint.
    """
    import json as _json

    from boomerang.cli import launch_processes
    from boomerang.distill import CHECKPOINT, METRICS, STUDENT, StepReport, checkpoint_step, truncate_metrics

    out = Path(cfg.out)
    stop = out.parent / f".{out.name}.stop"
    stop.unlink(missing_ok=True)
    log_path = out.parent / f"{out.name}.log"
    seen = {"step": 0, "offset": 0}
    if resume:  # lines past the checkpoint will be written again by the resumed run
        seen["step"] = checkpoint_step(out / CHECKPOINT)
        truncate_metrics(out / METRICS, seen["step"])

    def read_steps() -> None:
        path = out / METRICS
        if not path.is_file():
            return
        with open(path) as f:
            f.seek(seen["offset"])
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        seen["offset"] += len(complete.encode())
        for line in complete.splitlines():
            r = StepReport(**_json.loads(line))
            if r.step > seen["step"]:
                seen["step"] = r.step
                on_step(r)

    result: dict = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        runner = threading.Thread(target=lambda: result.update(
            rc=launch_processes(cfg, resume=resume, stop_file=str(stop), log=log)), daemon=True)
        runner.start()
        while runner.is_alive():
            runner.join(timeout=1.0)
            read_steps()
            if ctx.should_stop() and not stop.exists():
                stop.touch()
                ctx.log("cancel asked: the processes stop after this step and checkpoint")
    read_steps()
    stopped = stop.exists()
    stop.unlink(missing_ok=True)
    if result.get("rc") != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        ours = list(dict.fromkeys(line for line in lines if line.startswith("error: ")))  # our processes' own errors
        detail = "\n".join(ours) if ours else "the end of the log:\n" + "\n".join(lines[-15:])
        raise BoomerangError(f"the {cfg.processes} distillation processes failed (exit {result.get('rc')}; "
                             f"output in {log_path})\n{detail}")
    student = out / STUDENT
    if not stopped and not (student / "boomerang.json").is_file():
        raise BoomerangError(f"the distillation processes ended without writing {student}; see {log_path}")
    return seen["step"], stopped, None if stopped else student


def _register_student(ctx: JobContext, teacher, folder: Path) -> None:
    from boomerang.family import Family
    from boomerang.student import load_student

    student, manifest = load_student(folder, teacher)
    sizes = [s.to_dict() for s in Family(teacher.model, student, manifest.plan).sizes()]
    with Session(ctx.engine) as s:
        t = crud.get_or_create_teacher(session=s, source=teacher.source, fingerprint=teacher.fingerprint,
                                       n_layers=teacher.n_layers)
        crud.upsert_student(session=s, folder=str(folder), manifest=manifest.to_dict(), sizes=sizes,
                            job_id=ctx.job.id, teacher_id=t.id)


def _eval(ctx: JobContext) -> dict:
    from sqlmodel import select

    from boomerang.evaluate import EvalSettings
    from boomerang.family_eval import EvalRequest, evaluate_student
    from db.models import Student

    settings = dict(ctx.job.settings)
    eval_settings = EvalSettings(**settings.pop("settings", {}))
    req = EvalRequest(**settings, settings=eval_settings)

    def on_cell(done, total, key, task, skipped):
        ctx.log(f"{done}/{total} {key} {task}{' (cached)' if skipped else ''}")
        ctx.progress(done, total, force=done == total)

    report = evaluate_student(req, on_cell=on_cell, should_stop=ctx.should_stop)
    if ctx.should_stop():
        raise Cancelled
    with Session(ctx.engine) as s:
        student = s.exec(select(Student).where(Student.folder == str(Path(req.student).expanduser().resolve()))).first()
        added = crud.record_eval_rows(session=s, student_id=student.id if student else None, job_id=ctx.job.id,
                                      rows=report.rows)
    return {"cells": report.total, "computed": report.computed, "rows_added": added, "table": str(report.table),
            "charts": [str(c) for c in report.charts]}


def _export(ctx: JobContext) -> dict:
    from boomerang.export import export_size
    from boomerang.models import load_teacher
    from boomerang.student import load_family, read_manifest

    st = ctx.job.settings
    manifest = read_manifest(st["student"])
    teacher = load_teacher(st.get("teacher") or manifest.teacher_source)
    family, manifest = load_family(st["student"], teacher, st.get("order", "last"))
    out = export_size(family, int(st["layers"]), st["out"], tokenizer=teacher.tokenizer, teacher_source=teacher.source,
                      student_source=str(st["student"]), overwrite=bool(st.get("overwrite")))
    ctx.progress(1, 1, force=True)
    return {"folder": str(out), "layers": int(st["layers"])}


BODIES = {JobKind.DISTILL: _distill, JobKind.EVAL: _eval, JobKind.EXPORT: _export}


# ----------------------------------------------------------------------------- the sweep


def requeue_stale(engine, app, stale_after: float = STALE_AFTER_S) -> list[int]:
    """Put RUNNING jobs whose worker stopped beating back in the queue; returns their ids."""
    from sqlalchemy import update

    from db.models import Job, utcnow
    from workers.tasks import TASK_NAMES

    requeued = []
    cutoff = dt.timedelta(seconds=stale_after)
    with Session(engine) as s:
        for job in crud.stale_jobs(session=s, stale_after=cutoff):
            stmt = (update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING,
                                      Job.heartbeat_at < utcnow() - cutoff)
                    .values(status=JobStatus.QUEUED, log=(job.log + f"\nrequeued: worker {job.worker} stopped beating")[-4000:]))
            if s.exec(stmt).rowcount == 1:
                s.commit()
                app.send_task(TASK_NAMES[job.kind.value], args=[job.id], queue=job.queue)
                requeued.append(job.id)
    return requeued


def start_sweeper(engine_factory, app, every: float = 15.0, stale_after: float = STALE_AFTER_S) -> threading.Thread:
    """A daemon thread that requeues stale jobs every `every` seconds (first sweep at once)."""

    def loop():
        engine = engine_factory()
        while True:
            try:
                requeue_stale(engine, app, stale_after)
            except Exception:  # a database hiccup must not end the sweep
                traceback.print_exc()
            time.sleep(every)

    thread = threading.Thread(target=loop, daemon=True, name="stale-sweeper")
    thread.start()
    return thread
