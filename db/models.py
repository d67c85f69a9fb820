"""Tables, following Base / Create / Public / table=True.

JSON columns hold settings and results whose shape belongs to the library (DistillConfig,
evaluation settings), so the schema does not change when a setting is added.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class JobStatus(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
OPEN = (JobStatus.QUEUED, JobStatus.RUNNING)


class TeacherBase(SQLModel):
    source: str = Field(index=True, unique=True, description="default | hub id | folder | .gguf file")
    fingerprint: str | None = None
    n_layers: int | None = None


class TeacherRecord(TeacherBase, table=True):
    """A teacher jobs have used (the loaded model is `boomerang.models.Teacher`)."""

    __tablename__ = "teachers"
    id: int | None = Field(default=None, primary_key=True)
    created_at: dt.datetime = Field(default_factory=utcnow)


class JobBase(SQLModel):
    kind: str = Field(description="a kind of the job registry (workers.kinds.KINDS): distill, eval, export")
    settings: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    queue: str = Field(default="default", description="Celery queue the job is routed to")


class JobCreate(JobBase):
    pass


class Job(JobBase, table=True):
    __tablename__ = "jobs"
    id: int | None = Field(default=None, primary_key=True)
    status: JobStatus = Field(default=JobStatus.QUEUED, index=True)
    step: int = 0
    total: int = 0
    losses: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    tokens_per_s: float | None = None
    eta_s: float | None = None
    log: str = Field(default="", description="last log lines")
    phase: str | None = Field(default=None, description="what the job is doing when it is not counting steps")
    error: str | None = None
    attempts: int = 0
    worker: str | None = None
    heartbeat_at: dt.datetime | None = None
    cancel_requested: bool = False
    run_dir: str | None = None
    result: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    teacher_id: int | None = Field(default=None, foreign_key="teachers.id")
    created_at: dt.datetime = Field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


class JobPublic(JobBase):
    id: int
    status: JobStatus
    step: int
    total: int
    losses: dict
    tokens_per_s: float | None
    eta_s: float | None
    log: str
    phase: str | None
    error: str | None
    attempts: int
    worker: str | None
    heartbeat_at: dt.datetime | None
    run_dir: str | None
    result: dict
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class Student(SQLModel, table=True):
    """A student folder (distilled or freshly cut) and its manifest: one family."""

    __tablename__ = "students"
    id: int | None = Field(default=None, primary_key=True)
    job_id: int | None = Field(default=None, foreign_key="jobs.id", index=True)
    teacher_id: int | None = Field(default=None, foreign_key="teachers.id")
    folder: str = Field(unique=True)
    manifest: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)


class Size(SQLModel, table=True):
    """One member of a family."""

    __tablename__ = "sizes"
    __table_args__ = (UniqueConstraint("student_id", "n_layers"),)
    id: int | None = Field(default=None, primary_key=True)
    student_id: int = Field(foreign_key="students.id", index=True)
    n_layers: int
    params: int
    params_no_embed: int
    patched: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    layers: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class EvalResult(SQLModel, table=True):
    """One metric of one model on one task, with the settings that produced it."""

    __tablename__ = "eval_results"
    __table_args__ = (UniqueConstraint("student_id", "model_key", "task", "metric", "cell"),)
    id: int | None = Field(default=None, primary_key=True)
    student_id: int | None = Field(default=None, foreign_key="students.id", index=True)
    job_id: int | None = Field(default=None, foreign_key="jobs.id")
    model_key: str
    series: str
    n_layers: int
    params: int
    task: str = Field(index=True)
    metric: str
    value: float
    stderr: float | None = None
    cell: str = Field(description="result file name: task and settings hash")
    settings: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)


class StepMetric(SQLModel, table=True):
    """One optimizer step of a distillation job."""

    __tablename__ = "step_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    step: int
    loss: float
    """The weighted sum of the terms."""
    terms: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """Each loss term the recipe switched on, by name (the library's StepReport.terms)."""
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
