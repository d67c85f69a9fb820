"""The job kinds: for each, the request class it carries, the body that runs it, its Celery task name.

Submit, the runner, the CLI and the dashboard all go through this table. A request class is a
library settings class: `from_dict` builds and validates it (`__post_init__`), `check()` checks it
against the world before it is queued (files exist, the teacher's layer count fits the plan), and
`to_dict()` is what the job row stores. Adding a kind: a request class, a body, a row here, and the
`JobKind` value with its migration (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.evaluation.run import EvalRequest
from boomerang.export import ExportRequest
from boomerang.training.recipe import DistillConfig
from db.models import JobKind
from workers import bodies


@dataclass(frozen=True)
class JobType:
    request: type
    """The request class: `from_dict(settings)`, `check()`, `to_dict()`."""
    body: Callable
    """`body(ctx, request) -> result dict`, run by a worker."""
    task: str
    """The Celery task name (explicit and stable: messages already queued name it)."""
    on_submit: Callable | None = None
    """An extra check that only applies to queued jobs of this kind, or None."""


def _fresh_run_folder(cfg: DistillConfig) -> None:
    """A queued distillation writes into a folder of its own: an explicit one must not exist yet."""
    if cfg.out != DistillConfig.out and Path(cfg.out).expanduser().exists():
        raise BoomerangError(f"{cfg.out} already exists; leave out unset (a folder per job) or choose a new one")


KINDS: dict[JobKind, JobType] = {
    JobKind.DISTILL: JobType(DistillConfig, bodies.distill, "boomerang.distill", on_submit=_fresh_run_folder),
    JobKind.EVAL: JobType(EvalRequest, bodies.evaluate, "boomerang.evaluate"),
    JobKind.EXPORT: JobType(ExportRequest, bodies.export, "boomerang.export"),
}


def build_request(kind: JobKind | str, settings: dict):
    """The typed request of a job of `kind` from its stored settings (validated)."""
    return KINDS[JobKind(kind)].request.from_dict(dict(settings))
