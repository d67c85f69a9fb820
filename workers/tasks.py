"""Named Celery tasks. Each takes a job id, nothing else; the runner reloads the row."""

from __future__ import annotations

TASK_NAMES = {"distill": "boomerang.distill", "eval": "boomerang.evaluate", "export": "boomerang.export"}


def register(app) -> None:
    def make(kind: str):
        @app.task(name=TASK_NAMES[kind], ignore_result=False)
        def run(job_id: int) -> str:
            from workers.runner import run_job

            return run_job(job_id, expected_kind=kind)

        return run

    for kind in TASK_NAMES:
        make(kind)
