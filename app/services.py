"""What the dashboard's handlers need, built once by `make_services()` and passed to `build_app`."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from boomerang.family import Family
from boomerang.models import boomerang_home, load_teacher
from boomerang.student import cut_student, open_family
from boomerang.training.recipe import DistillConfig
from db.engine import make_engine
from workers.broker import make_sender


class ModelCache:
    """Teachers and families loaded once and shared by every browser session (weights are read-only).

    A size is then built from the teacher and student already in memory: switching sizes is instant.
    """

    def __init__(self, device: str = "cpu", dtype: str = "auto"):
        self.device, self.dtype = device, dtype
        self._teachers, self._families, self._lock = {}, {}, threading.Lock()

    def teacher(self, source: str):
        with self._lock:
            if source not in self._teachers:
                self._teachers[source] = load_teacher(source, device=self.device, dtype=self.dtype)
            return self._teachers[source]

    def opened(self, student_folder: str, order: str = "best", ends: str = "student"):
        """The student folder opened as a family (boomerang.student.StudentFamily), once per folder, order and ends."""

        key = (str(Path(student_folder).expanduser().resolve()), order, ends)
        if key not in self._families:
            opened = open_family(student_folder, order=order, load=self.teacher, ends=ends)
            with self._lock:
                self._families.setdefault(key, opened)
        return self._families[key]

    def cut_family(self, source: str):
        """(teacher, family) of a teacher's undistilled family (the paper's plan, a student sharing the teacher's
        layers): chattable before any distillation has finished."""

        teacher = self.teacher(source)
        key = ("cut", teacher.source)
        if key not in self._families:
            plan = DistillConfig(teacher=teacher.source).plan_for(teacher.n_layers)
            family = Family(teacher.model, cut_student(teacher.model, plan, share=True), plan)
            with self._lock:
                self._families.setdefault(key, (teacher, family))
        return self._families[key]

    def family(self, student_folder: str, order: str = "best", ends: str = "student"):
        """(teacher, family) for a student folder."""
        opened = self.opened(student_folder, order, ends)
        return opened.teacher, opened.family


@dataclass
class Services:
    engine: object
    """SQLAlchemy engine of the results database."""
    celery: object | None
    """Celery app used to queue jobs (None: launching is disabled)."""
    models: ModelCache = field(default_factory=ModelCache)
    eval_data_dir: str | None = None
    """Default folder of local evaluation files for the "evaluate" button."""
    eval_tasks: str = ""
    """Default tasks for the "evaluate" button."""
    queue: str = "default"
    """Celery queue that jobs launched here go to."""
    exports_dir: Path = field(default_factory=lambda: Path.home() / ".boomerang" / "exports")
    allowed_roots: tuple = ()
    """Folders besides the defaults (BOOMERANG_HOME, the working directory, the hub cache) whose files the
    browser may name as a teacher, training data or evaluation data (`boomerang app --allow-path DIR`)."""
    stops: dict = field(default_factory=dict)
    """Each chat session's stop flag, by the session's token (a gr.State holds only the token)."""

    def roots(self) -> list[Path]:
        hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        return [Path(p).expanduser().resolve() for p in (boomerang_home(), Path.cwd(), hub, *self.allowed_roots)]

    def path_allowed(self, path: str) -> bool:
        """Whether `path` lies under an allowed root once links are followed; the refusal is the same message
        whether or not the path exists, so it says nothing about what is on the server."""
        target = Path(path).expanduser().resolve()
        return any(target == root or root in target.parents for root in self.roots())

    def stop_event(self, token: str) -> threading.Event:
        return self.stops.setdefault(str(token), threading.Event())


def make_services(*, database_url: str | None = None, redis_url: str | None = None, eval_data_dir: str | None = None,
                  eval_tasks: str = "", device: str = "cpu", allowed_roots: tuple = ()) -> Services:

    return Services(engine=make_engine(database_url), celery=make_sender(redis_url), models=ModelCache(device),
                    eval_data_dir=eval_data_dir, eval_tasks=eval_tasks, exports_dir=boomerang_home() / "exports",
                    allowed_roots=tuple(allowed_roots))
