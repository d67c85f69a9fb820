"""The job-layer workflows that the CLI, the dashboard and the job bodies share, written once here:
registering a family in the database, queueing a family's distilled-at-size baselines."""

from __future__ import annotations

from sqlmodel import Session

from boomerang.student import StudentFamily
from boomerang.training.at_size import at_size_configs, is_done
from boomerang.training.recipe import DistillConfig
from db import crud
from db.models import Job, Student
from workers.submit import submit


def register_family(engine, opened: StudentFamily, *, job_id: int | None = None) -> Student:
    """The family's rows (its teacher, the student folder and every size), made or refreshed."""
    teacher = opened.teacher
    sizes = [z.to_dict() for z in opened.family.sizes()]
    with Session(engine) as s:
        t = crud.get_or_create_teacher(session=s, source=teacher.source, fingerprint=teacher.fingerprint,
                                       n_layers=teacher.n_layers)
        return crud.upsert_student(session=s, folder=str(opened.folder), manifest=opened.manifest.to_dict(),
                                   sizes=sizes, job_id=job_id, teacher_id=t.id)


def queue_at_size(*, engine, app, student: str, sizes: str | None = None,
                  queue: str = "default") -> list[tuple[DistillConfig, Job]]:
    """One distill job per size of the family not distilled yet (its recipe, data and budget); [] when all are."""
    configs = [c for c in at_size_configs(student, sizes) if not is_done(c)]
    for cfg in configs:
        cfg.check()  # every one before the first is queued
    return [(cfg, submit(engine=engine, app=app, kind="distill", settings=cfg.to_dict(), queue=queue)) for cfg in configs]
