"""The Celery app as the senders see it: connection and delivery settings, made by a function (nothing
connects at import). It holds no tasks: a message names its task by the registry's name
(`workers.kinds`), so the dashboard, `boomerang submit` and a job queueing its follow-ups never import
the code that runs jobs. A worker adds the tasks (`workers.app.make_celery`)."""

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


def make_sender(url: str | None = None) -> Celery:
    """A Celery app that can queue jobs (and that `workers.app` turns into a worker's app)."""
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
    return app
