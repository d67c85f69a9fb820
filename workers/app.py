"""The Celery app, made by a function (nothing connects at import)."""

from __future__ import annotations

import os

from celery import Celery

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# A message not acknowledged within this time is delivered again. Redelivery of a job still running
# is harmless (the claim in the database fails and the copy is dropped), and a job whose worker died
# is requeued by the heartbeat sweep long before this, so it can be long.
DEFAULT_VISIBILITY_TIMEOUT_S = 6 * 3600


def redis_url() -> str:
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


def make_celery(url: str | None = None) -> Celery:
    url = url or redis_url()
    app = Celery("boomerang", broker=url, backend=url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue="default",
        broker_transport_options={
            "visibility_timeout": int(os.environ.get("BOOMERANG_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S)),
        },
        broker_connection_retry_on_startup=True,
        result_expires=7 * 24 * 3600,
        task_serializer="json",
        accept_content=["json"],
    )
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    """One named task per job kind. Each takes a job id, nothing else; the runner reloads the row."""
    from workers.kinds import KINDS

    def make(kind: str, name: str):
        @app.task(name=name, ignore_result=False)
        def run(job_id: int) -> str:
            from workers.runner import run_job

            return run_job(job_id, expected_kind=kind)

        return run

    for kind, job_type in KINDS.items():
        make(kind.value, job_type.task)
