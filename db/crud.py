"""Small keyword-only CRUD functions. Every state change of a job happens here, in one statement
where two processes could race (claiming a job, requeueing a stale one)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, update
from sqlmodel import Session, select

from db.models import FINISHED, EvalResult, Job, JobCreate, JobStatus, Size, StepMetric, Student, TeacherRecord, utcnow


def create_job(*, session: Session, job_in: JobCreate, teacher_id: int | None = None) -> Job:
    job = Job.model_validate(job_in, update={"teacher_id": teacher_id})
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def get_job(*, session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(*, session: Session, limit: int = 100) -> list[Job]:
    return list(session.exec(select(Job).order_by(Job.id.desc()).limit(limit)))


def claim_job(*, session: Session, job_id: int, worker: str, stale_after: dt.timedelta) -> bool:
    """Atomically take a job to run: QUEUED, or RUNNING whose worker stopped beating. False otherwise.

    This is what makes a redelivered Celery message harmless: only one worker can hold a live job.
    """
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.cancel_requested == False,  # noqa: E712
               (Job.status == JobStatus.QUEUED)
               | ((Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < now - stale_after)))
        .values(status=JobStatus.RUNNING, worker=worker, heartbeat_at=now, attempts=Job.attempts + 1,
                started_at=now, error=None)
    )
    claimed = session.exec(stmt).rowcount == 1
    session.commit()
    return claimed


def heartbeat(*, session: Session, job_id: int, worker: str) -> bool:
    """Refresh a running job's heartbeat; False if the job is no longer this worker's."""
    stmt = (update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
            .values(heartbeat_at=utcnow()))
    ok = session.exec(stmt).rowcount == 1
    session.commit()
    return ok


def update_progress(*, session: Session, job_id: int, **fields) -> None:
    session.exec(update(Job).where(Job.id == job_id).values(**fields))
    session.commit()


def finish_job(*, session: Session, job_id: int, status: JobStatus, error: str | None = None,
               result: dict | None = None) -> None:
    values = {"status": status, "finished_at": utcnow(), "error": error, "phase": None}
    if result is not None:
        values["result"] = result
    session.exec(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def request_cancel(*, session: Session, job_id: int) -> Job:
    """Ask a job to stop: a queued one is cancelled at once, a running one within one step."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.status in FINISHED:
        return job
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        job.status, job.finished_at = JobStatus.CANCELLED, utcnow()
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def take_back(*, session: Session, job_id: int, note: str) -> bool:
    """Cancel a job no worker has claimed, in one statement, so that the caller can do its work itself; False if a
    worker holds it (or it ended) by now."""
    stmt = (update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow(), error=note))
    done = session.exec(stmt).rowcount == 1
    session.commit()
    return done


def retry_job(*, session: Session, job_id: int) -> Job:
    """Put a FAILED or CANCELLED job back in the queue; it resumes from its checkpoint if it has one."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ValueError(f"job {job_id} is {job.status.value}; only FAILED or CANCELLED jobs can be retried")
    job.status, job.cancel_requested, job.error, job.finished_at = JobStatus.QUEUED, False, None, None
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def stale_jobs(*, session: Session, stale_after: dt.timedelta) -> list[Job]:
    """RUNNING jobs whose worker has not beaten for `stale_after`: their worker died."""
    cutoff = utcnow() - stale_after
    return list(session.exec(select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)))


def requeue_stale_job(*, session: Session, job: Job, stale_after: dt.timedelta) -> bool:
    """Put a RUNNING job whose worker stopped beating back to QUEUED, in one statement; False if it beat since."""
    note = f"\nrequeued: worker {job.worker} stopped beating"
    stmt = (update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < utcnow() - stale_after)
            .values(status=JobStatus.QUEUED, log=(job.log + note)[-4000:]))
    done = session.exec(stmt).rowcount == 1
    session.commit()
    return done


def record_steps(*, session: Session, job_id: int, steps: list[dict]) -> None:
    """Store step reports (the library's StepReport.to_dict()); loss terms go into `terms` by name."""
    for s in steps:
        session.add(StepMetric(job_id=job_id, **{k: s[k] for k in (
            "step", "loss", "terms", "lr", "grad_norm", "tokens", "tokens_per_s")}))
    session.commit()


def forget_steps_after(*, session: Session, job_id: int, step: int) -> None:
    """Drop metrics past a checkpoint: a resumed job logs those steps again, once."""
    session.exec(delete(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step > step))
    session.commit()


def steps_of(*, session: Session, job_id: int) -> list[StepMetric]:
    return list(session.exec(select(StepMetric).where(StepMetric.job_id == job_id).order_by(StepMetric.step)))


def get_or_create_teacher(*, session: Session, source: str, fingerprint: str | None = None,
                          n_layers: int | None = None) -> TeacherRecord:
    teacher = session.exec(select(TeacherRecord).where(TeacherRecord.source == source)).first()
    if teacher is None:
        teacher = TeacherRecord(source=source, fingerprint=fingerprint, n_layers=n_layers)
    elif fingerprint:
        teacher.fingerprint, teacher.n_layers = fingerprint, n_layers
    session.add(teacher)
    session.commit()
    session.refresh(teacher)
    return teacher


def list_teachers(*, session: Session) -> list[TeacherRecord]:
    return list(session.exec(select(TeacherRecord).order_by(TeacherRecord.created_at.desc())))


def upsert_student(*, session: Session, folder: str, manifest: dict, sizes: list[dict], job_id: int | None = None,
                   teacher_id: int | None = None) -> Student:
    student = session.exec(select(Student).where(Student.folder == folder)).first() or Student(folder=folder)
    student.manifest, student.job_id, student.teacher_id = manifest, job_id, teacher_id
    session.add(student)
    session.flush()
    session.exec(delete(Size).where(Size.student_id == student.id))
    for s in sizes:
        session.add(Size(student_id=student.id, n_layers=s["n_layers"], params=s["params"],
                         params_no_embed=s["params_no_embed"], patched=list(s["patched"]), layers=list(s["layers"])))
    session.commit()
    session.refresh(student)
    return student


def list_students(*, session: Session) -> list[Student]:
    return list(session.exec(select(Student).order_by(Student.id.desc())))


def sizes_of(*, session: Session, student_id: int) -> list[Size]:
    return list(session.exec(select(Size).where(Size.student_id == student_id).order_by(Size.n_layers)))


def record_eval_rows(*, session: Session, student_id: int | None, job_id: int | None, rows: list[dict]) -> int:
    """Insert evaluation rows not yet stored (same student, model, task, metric and cell); returns how many."""
    existing = {(r.model_key, r.task, r.metric, r.cell) for r in
                session.exec(select(EvalResult).where(EvalResult.student_id == student_id))}
    added = 0
    for r in rows:
        ident = (r["key"], r["task"], r["metric"], r["cell"])
        if ident in existing or r["value"] is None or r["value"] != r["value"]:  # NaN: not measured
            continue
        session.add(EvalResult(student_id=student_id, job_id=job_id, model_key=r["key"], series=r["series"],
                               n_layers=r["n_layers"], params=r["params"], task=r["task"], metric=r["metric"],
                               value=r["value"], stderr=r.get("stderr"), cell=r["cell"],
                               settings={**(r.get("settings") or {}),  # and how the number was made, when known
                                         **({"provenance": r["provenance"]} if r.get("provenance") else {}),
                                         **({"params_no_embed": r["params_no_embed"]} if r.get("params_no_embed") else {})}))
        existing.add(ident)
        added += 1
    session.commit()
    return added


def eval_results(*, session: Session, student_id: int) -> list[EvalResult]:
    return list(session.exec(select(EvalResult).where(EvalResult.student_id == student_id)))
