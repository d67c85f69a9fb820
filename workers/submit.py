"""Submitting jobs: validate with the library's own messages, then write the row, then queue the id.

Nothing reaches the queue or the database unless the settings pass: a bad teacher, plan or data
path is rejected here, before any worker sees it.
"""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session

from boomerang.errors import BoomerangError
from db import crud
from db.models import Job, JobCreate, JobKind
from workers.tasks import TASK_NAMES


def teacher_layer_count(source: str) -> int:
    """The teacher's layer count without loading its weights."""
    from transformers import AutoConfig

    from boomerang import models

    kind = models.classify_source(source)
    if kind in ("default", "gguf"):
        gguf = models.default_gguf_path() if kind == "default" else Path(source).expanduser()
        return _gguf_block_count(gguf)
    if kind == "hub":
        reason = models._hub_unreachable_reason()
        if reason and not models._in_hub_cache(source):
            raise BoomerangError(f"unknown teacher {source!r}: not a local folder, and the hub cannot be checked ({reason})")
    config = AutoConfig.from_pretrained(Path(source).expanduser() if kind == "folder" else source)
    from boomerang.arch import adapter_for

    adapter_for(config)
    return config.num_hidden_layers


def _gguf_block_count(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return int(reader.fields[f"{arch}.block_count"].parts[-1][0])


def validate_distill(settings: dict) -> dict:
    from boomerang.distill import DistillConfig

    cfg = DistillConfig.from_dict(settings)
    cfg.plan_for(teacher_layer_count(cfg.teacher))
    if cfg.data != "teacher" and not cfg.data.startswith("hub:"):
        from boomerang.data import read_documents

        path = Path(cfg.data).expanduser()
        if not path.exists():
            raise BoomerangError(f"data not found: {path}")
        if path.is_file() and path.stat().st_size < 50_000_000:
            read_documents(str(path), text_field=cfg.text_field)  # bad lines are named now, not hours later
    if cfg.out != "runs/distill" and Path(cfg.out).expanduser().exists():
        raise BoomerangError(f"{cfg.out} already exists; leave out unset (a folder per job) or choose a new one")
    settings = cfg.to_dict()
    if settings["out"] == "runs/distill":
        settings["out"] = None  # the worker gives each job its own folder under BOOMERANG_HOME
    return settings


def validate_eval(settings: dict) -> dict:
    from boomerang import tasks
    from boomerang.evaluate import EvalSettings
    from boomerang.family_eval import BASELINES, EvalRequest
    from boomerang.plan import parse_layer_list
    from boomerang.student import read_manifest

    nested = EvalSettings(**settings.get("settings", {}))
    req = EvalRequest(**{k: v for k, v in settings.items() if k != "settings"}, settings=nested)
    req.student = str(Path(req.student).expanduser().resolve())
    read_manifest(req.student)
    if req.tasks:
        tasks.resolve(req.tasks, req.data_dir)
    if req.sizes != "all":
        parse_layer_list(req.sizes)
    unknown = sorted(set(req.baselines) - set(BASELINES))
    if unknown:
        raise BoomerangError(f"unknown baselines {unknown}: choose from {', '.join(BASELINES)}")
    if not (req.tasks or req.heldout_data or req.cost):
        raise BoomerangError("nothing to evaluate: give tasks, held-out data or cost")
    return {**{k: v for k, v in vars(req).items() if k != "settings"}, "settings": vars(nested)}


def validate_export(settings: dict) -> dict:
    from boomerang.outputs import check_output_dir
    from boomerang.student import read_manifest

    read_manifest(settings["student"])
    check_output_dir(settings["out"], overwrite=bool(settings.get("overwrite")))
    return {**settings, "layers": int(settings["layers"]), "student": str(Path(settings["student"]).expanduser().resolve())}


VALIDATORS = {JobKind.DISTILL: validate_distill, JobKind.EVAL: validate_eval, JobKind.EXPORT: validate_export}


def submit(*, engine, app, kind: str, settings: dict, queue: str = "default") -> Job:
    """Validate, record and queue a job; a BoomerangError leaves nothing behind."""
    kind = JobKind(kind)
    clean = VALIDATORS[kind](dict(settings))
    with Session(engine) as s:
        teacher_id = None
        if kind == JobKind.DISTILL:
            teacher_id = crud.get_or_create_teacher(session=s, source=clean["teacher"]).id
        job = crud.create_job(session=s, job_in=JobCreate(kind=kind, settings=clean, queue=queue), teacher_id=teacher_id)
        try:
            _send(app, kind.value, job.id, queue)
        except BoomerangError:
            s.delete(job)  # no row for a job that never reached the queue
            s.commit()
            raise
    return job


def _send(app, kind: str, job_id: int, queue: str) -> None:
    try:
        app.send_task(TASK_NAMES[kind], args=[job_id], queue=queue, retry=False)
    except Exception as exc:  # kombu raises several types for "broker unreachable"
        raise BoomerangError(
            f"could not queue the job: Redis at {app.conf.broker_url} is unreachable ({type(exc).__name__}). "
            "Start it (redis-server) or set REDIS_URL"
        ) from exc


def requeue(*, engine, app, job_id: int) -> Job:
    """Retry a FAILED or CANCELLED job (it resumes from its checkpoint)."""
    with Session(engine) as s:
        job = crud.retry_job(session=s, job_id=job_id)
    _send(app, job.kind.value, job.id, job.queue)
    return job
