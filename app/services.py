"""What the dashboard's handlers need, built once by `make_services()` and passed to `build_app`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


class ModelCache:
    """Teachers and families loaded once and shared by every browser session (weights are read-only).

    A size is then built from the teacher and student already in memory: switching sizes is instant.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._teachers, self._families, self._lock = {}, {}, threading.Lock()

    def teacher(self, source: str):
        from boomerang.models import load_teacher

        with self._lock:
            if source not in self._teachers:
                self._teachers[source] = load_teacher(source, device=self.device)
            return self._teachers[source]

    def family(self, student_folder: str, order: str = "last"):
        """(teacher, family) for a student folder."""
        from boomerang.student import open_family

        key = (str(Path(student_folder).expanduser().resolve()), order)
        if key not in self._families:
            opened = open_family(student_folder, order=order, load=self.teacher)
            with self._lock:
                self._families.setdefault(key, opened)
        opened = self._families[key]
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


def make_services(*, database_url: str | None = None, redis_url: str | None = None, eval_data_dir: str | None = None,
                  eval_tasks: str = "", device: str = "cpu") -> Services:
    from boomerang.models import boomerang_home
    from db.engine import make_engine
    from workers.app import make_celery

    return Services(engine=make_engine(database_url), celery=make_celery(redis_url), models=ModelCache(device),
                    eval_data_dir=eval_data_dir, eval_tasks=eval_tasks, exports_dir=boomerang_home() / "exports")
