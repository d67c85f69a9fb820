"""The job kinds: one row each, naming the request class a job carries, its Celery task and how the
dashboard and `boomerang jobs` word its progress.

Submit, the runner, the Celery app, the CLI and the dashboard all read this table; the code that runs
a kind lives in `workers.bodies.BODIES`, keyed by the same name, so this table imports no job code. A
request class is a library settings class: `from_dict` builds and validates it (`__post_init__`),
`check()` checks it against the world before it is queued (files exist, the teacher's layer count fits
the plan), and `to_dict()` is what the job row stores. A job row stores its kind as the row's name (a
string); adding a kind is a request class, a body and a row here (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.evaluation.run import EvalRequest
from boomerang.export import ExportRequest
from boomerang.training.parallel import NodeShare
from boomerang.training.recipe import DistillConfig


@dataclass(frozen=True)
class JobType:
    request: type
    """The request class: `from_dict(settings)`, `check()`, `to_dict()`."""
    task: str
    """The Celery task name (explicit and stable: messages already queued name it)."""
    help: str
    """One line for `boomerang submit KIND --help` and the dashboard."""
    unit: str = "item"
    """What the job's progress counts (step, cell, size): 'step 3/40', 'cell 12/186'."""
    rate: bool = False
    """Whether its progress has a token rate worth showing (training does; counting cells does not)."""
    on_submit: Callable | None = None
    """An extra check that only applies to queued jobs of this kind, or None."""
    offered: bool = True
    """Whether `boomerang submit` offers it; a kind that only jobs queue (a multi-machine run's nodes) is not."""


def _fresh_run_folder(cfg: DistillConfig) -> None:
    """A queued distillation writes into a folder of its own: an explicit one must not exist yet."""
    if cfg.out != DistillConfig.out and Path(cfg.out).expanduser().exists():
        raise BoomerangError(f"{cfg.out} already exists; leave out unset (a folder per job) or choose a new one")


KINDS: dict[str, JobType] = {
    "distill": JobType(DistillConfig, "boomerang.distill", "queue a distillation (same settings as `boomerang distill`)",
                       unit="step", rate=True, on_submit=_fresh_run_folder),
    "eval": JobType(EvalRequest, "boomerang.evaluate", "queue an evaluation (same settings as `boomerang eval`)",
                    unit="cell"),
    "export": JobType(ExportRequest, "boomerang.export", "queue an export of one size", unit="size"),
    "node": JobType(NodeShare, "boomerang.node", "join a multi-machine distillation as one of its other machines (its "
                    "node-0 job queues these; docs/scale-out.md)", unit="step", rate=True, offered=False),
}


def job_type(kind: str) -> JobType:
    """The registry row of `kind`; a BoomerangError naming the kinds there are otherwise."""
    try:
        return KINDS[str(kind)]
    except KeyError:
        raise BoomerangError(f"no job kind {kind!r}: one of {', '.join(KINDS)}") from None


def build_request(kind: str, settings: dict):
    """The typed request of a job of `kind` from its stored settings (validated)."""
    return job_type(kind).request.from_dict(dict(settings))


def progress_text(kind: str, step: int, total: int, tokens_per_s: float | None) -> str:
    """A job's progress in words, as the dashboard and `boomerang jobs` show it."""
    row = KINDS.get(kind)
    if not total and not (row and row.rate):
        return "waiting"
    text = f"{row.unit if row else 'item'} {step}/{total}"
    return text + (f" · {round(tokens_per_s or 0)} tokens/s" if row and row.rate else "")
