"""Submitting jobs: build the kind's typed request (it validates itself), check it against the world,
then write the row, then queue the id.

Nothing reaches the queue or the database unless the request passes: a bad teacher, plan or data
path is rejected here, with the library's own message, before any worker sees it.
"""

from __future__ import annotations

from sqlmodel import Session

from boomerang.errors import BoomerangError
from db import crud
from db.models import Job, JobCreate
from workers.kinds import build_request, job_type


def validate(kind: str, settings: dict) -> dict:
    """The settings a job of `kind` will run with, checked as at submit; a BoomerangError says what to fix."""
    request = build_request(kind, settings)
    request.check()
    if job_type(kind).on_submit:
        job_type(kind).on_submit(request)
    return request.to_dict()


def submit(*, engine, app, kind: str, settings: dict, queue: str = "default") -> Job:
    """Validate, record and queue a job; a BoomerangError leaves nothing behind."""
    clean = validate(kind, settings)
    with Session(engine) as s:
        teacher_id = crud.get_or_create_teacher(session=s, source=clean["teacher"]).id if clean.get("teacher") else None
        job = crud.create_job(session=s, job_in=JobCreate(kind=kind, settings=clean, queue=queue), teacher_id=teacher_id)
        try:
            send(app, job)
        except BoomerangError:
            s.delete(job)  # no row for a job that never reached the queue
            s.commit()
            raise
    return job


def send(app, job: Job) -> None:
    """Put a job's id on its queue, under its kind's task name."""
    try:
        app.send_task(job_type(job.kind).task, args=[job.id], queue=job.queue, retry=False)
    except Exception as exc:  # kombu raises several types for "broker unreachable"
        raise BoomerangError(
            f"could not queue the job: Redis at {app.conf.broker_url} is unreachable ({type(exc).__name__}). "
            "Start it (redis-server) or set REDIS_URL"
        ) from exc


def requeue(*, engine, app, job_id: int) -> Job:
    """Retry a FAILED or CANCELLED job (it resumes from its checkpoint); if it cannot be queued, nothing changes."""
    with Session(engine) as s:
        before = crud.get_job(session=s, job_id=job_id)
        status, error = (before.status, before.error) if before else (None, None)
        job = crud.retry_job(session=s, job_id=job_id)
        try:
            send(app, job)
        except BoomerangError:
            crud.finish_job(session=s, job_id=job_id, status=status, error=error)
            raise
    return job
