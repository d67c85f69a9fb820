"""What a running job's body works with: its context (progress, log, the stop flag) and its heartbeat.

The library reports through callbacks; a body turns those reports into `ctx.progress(...)` and
`ctx.log(...)`, and passes `ctx.should_stop` as the library's stop flag.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

from sqlmodel import Session

from boomerang.errors import BoomerangError
from db import crud

HEARTBEAT_S = float(os.environ.get("BOOMERANG_HEARTBEAT_S", "5"))
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


@dataclass(frozen=True)
class FollowUp:
    """A job a body wants queued once it has succeeded (the runner queues it, on the job's own queue)."""

    kind: str
    request: object
    """The follow-up's typed request (its `to_dict()` is what is queued)."""
    result_key: str
    """Where the job's result records the follow-up's job id (None when it could not be queued)."""
    what: str
    """For the log: 'the standard evaluation of this family'."""


@dataclass(frozen=True)
class Outcome:
    """What a body returns: the job's result (a JSON object) and the jobs to queue after it."""

    result: dict
    follow_ups: tuple[FollowUp, ...] = field(default_factory=tuple)


class JobContext:
    """What a job body gets: progress reporting, the stop flag, and the job row's settings."""

    def __init__(self, engine, job, beat: Heartbeat, app=None):
        self.engine, self.job, self.beat = engine, job, beat
        self.app = app
        """The Celery app that queues the jobs this one starts (None: a sender to REDIS_URL, made when needed)."""
        self._checked, self._cancel = 0.0, False
        self._pending, self._flushed, self._log, self._latest = [], 0.0, [], {}

    def sender(self):
        """The Celery app this job queues jobs with: the worker's, or a sender to REDIS_URL made on first use."""
        if self.app is None:
            from workers.broker import make_sender
            self.app = make_sender()
        return self.app

    def queue_job(self, kind: str, settings: dict, what: str, *, queue: str | None = None,
                  instead: str | None = None) -> int | None:
        """Queue a job this one starts (on `queue`, default this job's own) and log it; None when it cannot be queued,
        logged with `instead` (default: how to start it by hand). `what` names it in the log ('part 2/3')."""
        from workers.submit import submit
        try:
            job = submit(engine=self.engine, app=self.sender(), kind=kind, settings=settings,
                         queue=queue or self.job.queue)
        except BoomerangError as exc:
            self.log(f"{what} was not queued ({exc}); "
                     + (instead or f"start it from the Jobs tab or with boomerang submit {kind}"))
            return None
        self.log(f"queued {what} as job {job.id}")
        return job.id

    def should_stop(self) -> bool:
        """The library's stop flag. A stop writes a checkpoint next: the step rows it covers are stored first."""
        if self.beat.lost:
            return True
        now = time.monotonic()
        if now - self._checked > 1.0:
            with Session(self.engine) as s:
                self._cancel = bool(crud.get_job(session=s, job_id=self.job.id).cancel_requested)
            self._checked = now
        if self._cancel and self._pending:
            self.flush()
        return self._cancel

    def log(self, line: str) -> None:
        self._log = (self._log + [line])[-LOG_LINES:]

    def progress(self, step: int, total: int, *, steps: list[dict] | None = None, force: bool = False, **fields) -> None:
        """Buffer step metrics; write progress to the database at least every PROGRESS_EVERY_S."""
        self._pending += steps or []
        self._latest = {"step": step, "total": total, **fields}
        if force or time.monotonic() - self._flushed >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Store buffered step rows and the latest progress now."""
        with Session(self.engine) as s:
            if self._pending:
                crud.record_steps(session=s, job_id=self.job.id, steps=self._pending)
            if self._latest:
                crud.update_progress(session=s, job_id=self.job.id, log="\n".join(self._log), **self._latest)
        self._pending, self._flushed = [], time.monotonic()
