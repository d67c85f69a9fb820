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
import threading
import time
import traceback

from sqlmodel import Session

from boomerang.errors import BoomerangError
from db import crud
from db.engine import make_engine
from db.models import JobStatus
from workers.bodies import BODIES
from workers.context import Cancelled, FollowUp, Heartbeat, JobContext, worker_name
from workers.kinds import build_request
from workers.submit import send

STALE_AFTER_S = float(os.environ.get("BOOMERANG_STALE_AFTER_S", "60"))


def run_job(job_id: int, *, expected_kind: str | None = None, engine=None, worker: str | None = None,
            stale_after: float = STALE_AFTER_S, app=None) -> str:
    """Claim and run a job to its end; returns the final status, or "skipped" if another worker holds it.

    `app` queues the follow-ups a body asks for (default: a sender to REDIS_URL)."""
    engine = engine or make_engine()
    worker = worker or worker_name()
    with Session(engine) as s:
        if not crud.claim_job(session=s, job_id=job_id, worker=worker, stale_after=dt.timedelta(seconds=stale_after)):
            return "skipped"
        job = crud.get_job(session=s, job_id=job_id)
    if expected_kind and job.kind != expected_kind:
        _finish(engine, job_id, JobStatus.FAILED, f"job {job_id} is a {job.kind} job, sent to the {expected_kind} task")
        return JobStatus.FAILED.value
    beat = Heartbeat(engine, job_id, worker)
    beat.start()
    ctx = JobContext(engine, job, beat, app)
    try:
        outcome = BODIES[job.kind](ctx, build_request(job.kind, job.settings))
        if beat.lost:
            return "lost"  # another worker took the job over; it will finish it
        result = {**outcome.result, **queue_follow_ups(ctx, outcome.follow_ups)}
        _finish(engine, job_id, JobStatus.SUCCEEDED, result=result)
        return JobStatus.SUCCEEDED.value
    except Cancelled:
        _finish(engine, job_id, JobStatus.CANCELLED)
        return JobStatus.CANCELLED.value
    except Exception as exc:  # a failing job must never take the worker down
        ctx.log(traceback.format_exc(limit=5))
        ctx.progress(job.step, job.total, force=True)
        message = str(exc) if isinstance(exc, BoomerangError) else f"{type(exc).__name__}: {exc}"
        _finish(engine, job_id, JobStatus.FAILED, message[:4000])
        return JobStatus.FAILED.value
    finally:
        beat.done.set()


def queue_follow_ups(ctx: JobContext, follow_ups: tuple[FollowUp, ...]) -> dict:
    """Queue what a successful body asked for, on the job's queue; {result_key: job id, or None if not queued}.

    The job succeeded whatever happens here: a follow-up that cannot be queued is logged with how to start it."""
    ids = {f.result_key: ctx.queue_job(f.kind, f.request.to_dict(), f.what) for f in follow_ups}
    if follow_ups:
        ctx.flush()
    return ids


def _finish(engine, job_id: int, status: JobStatus, error: str | None = None, result: dict | None = None) -> None:
    with Session(engine) as s:
        crud.finish_job(session=s, job_id=job_id, status=status, error=error, result=result)


# ----------------------------------------------------------------------------- the sweep


def requeue_stale(engine, app, stale_after: float = STALE_AFTER_S) -> list[int]:
    """Put RUNNING jobs whose worker stopped beating back in the queue; returns their ids."""
    requeued = []
    cutoff = dt.timedelta(seconds=stale_after)
    with Session(engine) as s:
        for job in crud.stale_jobs(session=s, stale_after=cutoff):
            if crud.requeue_stale_job(session=s, job=job, stale_after=cutoff):
                send(app, job)
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
