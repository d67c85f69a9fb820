"""The worker's Celery app: the sender's settings (`workers.broker`) plus one named task per job kind."""

from __future__ import annotations

from celery import Celery

from workers.broker import make_sender, redis_url
from workers.kinds import KINDS
from workers.runner import run_job

__all__ = ["make_celery", "redis_url"]


def make_celery(url: str | None = None) -> Celery:
    app = make_sender(url)
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    """One named task per job kind. Each takes a job id, nothing else; the runner reloads the row."""

    def make(kind: str, name: str):
        @app.task(name=name, ignore_result=False)
        def run(job_id: int) -> str:
            return run_job(job_id, expected_kind=kind, app=app)

        return run

    for kind, job_type in KINDS.items():
        make(kind, job_type.task)
