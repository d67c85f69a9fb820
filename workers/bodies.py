"""Job bodies: what a worker does for each kind of job, given the job's context and its typed request.

A body calls the library, turns its reports into progress and log lines, raises `Cancelled` when
asked to stop, and returns an `Outcome`: the job's result (a JSON object) and the follow-up jobs it
wants queued (the runner queues them). `BODIES` maps a kind of `workers.kinds.KINDS` to its body.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session, select

from boomerang.errors import BoomerangError
from boomerang.evaluation.run import EvalRequest, evaluate_student
from boomerang.export import ExportRequest, run_export
from boomerang.models import boomerang_home, load_teacher
from boomerang.student import open_family
from boomerang.training.checkpoint import CHECKPOINT, METRICS, RECIPE, STUDENT, checkpoint_step, truncate_metrics
from boomerang.training.loop import StepReport
from boomerang.training.loop import distill as run_distillation
from boomerang.training.parallel import launch_processes, run_device
from boomerang.training.recipe import DistillConfig
from db import crud
from db.models import Student
from workers.context import Cancelled, FollowUp, JobContext, Outcome, worker_name
from workers.workflows import register_family

# ----------------------------------------------------------------------------- distill


def run_dir_for(job, cfg: DistillConfig) -> Path:
    """The run folder: the one the job asked for, or a folder of its own under BOOMERANG_HOME."""
    asked = cfg.out != DistillConfig.out
    return Path(cfg.out if asked else boomerang_home() / "runs" / f"job-{job.id}").expanduser().resolve()


def distill(ctx: JobContext, cfg: DistillConfig) -> Outcome:
    if cfg.nnodes > 1:
        raise BoomerangError(f"nnodes={cfg.nnodes}: a run over several machines is started from the command line on each "
                             "of them (`boomerang distill --nnodes N --node-rank R --rdzv HOST:PORT`, "
                             "docs/scale-out.md); a queued job runs on one worker's machine")
    job = ctx.job
    out = run_dir_for(job, cfg)
    cfg = dataclasses.replace(cfg, out=str(out))
    resume = (out / RECIPE).is_file()  # started before: from its checkpoint, or from step 0 if it had none
    with Session(ctx.engine) as s:
        crud.update_progress(session=s, job_id=job.id, run_dir=str(out), total=cfg.steps)
    where = f"{cfg.processes} processes" if cfg.processes > 1 else f"one process on {run_device(cfg)}"
    ctx.log(f"{'resuming' if resume else 'starting'} on {worker_name()} ({where}): {cfg.steps} steps into {out}")
    first = {"seen": False, "step": 0}

    def on_step(r) -> None:
        if not first["seen"]:
            first["seen"], first["step"] = True, r.step
            with Session(ctx.engine) as s:  # steps past the checkpoint are logged again: drop the old ones
                crud.forget_steps_after(session=s, job_id=job.id, step=r.step - 1)
        ctx.log(f"step {r.step}/{r.total} loss {r.loss:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in r.terms.items()))
        # when a checkpoint follows this report, the rows it covers are in the database before it exists
        ctx.progress(r.step, r.total, steps=[r.to_dict()], force=r.checkpoint or r.step == first["step"],
                     losses={"loss": r.loss, **r.terms}, tokens_per_s=r.tokens_per_s, eta_s=r.eta_s,
                     phase="training")

    def on_phase(p) -> None:  # before the first step: loading, writing the corpus, choosing the plan
        ctx.log(p.text())
        ctx.progress(p.done, p.total, force=p.done in (0, p.total), phase=p.text(), eta_s=p.eta_s, tokens_per_s=None)

    if cfg.processes > 1:
        steps_done, stopped, student_dir = _distill_processes(ctx, cfg, resume, on_step)
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype)  # on the host: only to list the family's sizes
    else:
        # one decision: the teacher is loaded where the run runs, and the family built after follows it
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device=str(run_device(cfg)))
        result = run_distillation(cfg, on_step=on_step, should_stop=ctx.should_stop, resume=resume, teacher=teacher,
                                  on_phase=on_phase)
        steps_done, stopped, student_dir = result.steps_done, result.stopped, result.student_dir
    ctx.progress(steps_done, cfg.steps, force=True, phase="registering the family")
    if stopped:
        raise Cancelled
    register_family(ctx.engine, open_family(student_dir, teacher=teacher), job_id=job.id)
    result = {"student_dir": str(student_dir), "steps": steps_done,
              "resumed_from": first["step"] - 1 if first["seen"] else steps_done}
    follow_ups = ()
    if cfg.evaluate:  # the job asked for its family's standard evaluation once saved
        follow_ups = (FollowUp("eval", EvalRequest.after_distillation(str(student_dir)), "evaluation_job",
                               "the standard evaluation of this family"),)
    return Outcome(result, follow_ups)


def _distill_processes(ctx: JobContext, cfg: DistillConfig, resume: bool, on_step) -> tuple[int, bool, Path | None]:
    """One job on several processes (GPUs): torchrun in a child, its steps read back from metrics.jsonl.

    Cancelling creates the stop file the processes watch: they finish the step and checkpoint.
    """
    out = Path(cfg.out)
    stop = out.parent / f".{out.name}.stop"
    stop.unlink(missing_ok=True)
    log_path = out.parent / f"{out.name}.log"
    seen = {"step": 0, "offset": 0}
    if resume:  # lines past the checkpoint (all of them, without one) will be written again by the resumed run
        seen["step"] = checkpoint_step(out / CHECKPOINT) if (out / CHECKPOINT).is_file() else 0
        truncate_metrics(out / METRICS, seen["step"])

    def read_steps() -> None:
        path = out / METRICS
        if not path.is_file():
            return
        with open(path) as f:
            f.seek(seen["offset"])
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        seen["offset"] += len(complete.encode())
        for line in complete.splitlines():
            r = StepReport.from_dict(json.loads(line))
            if r.step > seen["step"]:
                seen["step"] = r.step
                on_step(r)

    result: dict = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        runner = threading.Thread(target=lambda: result.update(
            rc=launch_processes(cfg, resume=resume, stop_file=str(stop), log=log)), daemon=True)
        runner.start()
        while runner.is_alive():
            runner.join(timeout=1.0)
            read_steps()
            if ctx.should_stop() and not stop.exists():
                stop.touch()
                ctx.log("cancel asked: the processes stop after this step and checkpoint")
    read_steps()
    stopped = stop.exists()
    stop.unlink(missing_ok=True)
    if result.get("rc") != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        ours = list(dict.fromkeys(line for line in lines if line.startswith("error: ")))  # our processes' own errors
        detail = "\n".join(ours) if ours else "the end of the log:\n" + "\n".join(lines[-15:])
        raise BoomerangError(f"the {cfg.processes} distillation processes failed (exit {result.get('rc')}; "
                             f"output in {log_path})\n{detail}")
    student = out / STUDENT
    if not stopped and not (student / "boomerang.json").is_file():
        raise BoomerangError(f"the distillation processes ended without writing {student}; see {log_path}")
    return seen["step"], stopped, None if stopped else student


# ----------------------------------------------------------------------------- evaluate


def evaluate(ctx: JobContext, req: EvalRequest) -> Outcome:
    start, computed, added = time.monotonic(), {"n": 0}, {"rows": 0}
    with Session(ctx.engine) as s:
        student = s.exec(select(Student).where(Student.folder == req.student)).first()
        student_id = student.id if student else None

    def on_rows(rows):  # each cell's rows reach the results table as the cell lands: the Compare tab fills in
        with Session(ctx.engine) as s:
            added["rows"] += crud.record_eval_rows(session=s, student_id=student_id, job_id=ctx.job.id, rows=rows)

    def on_cell(done, total, key, task, skipped):
        ctx.log(f"{done}/{total} {key} {task}{' (cached)' if skipped else ''}")
        computed["n"] += 0 if skipped else 1
        per_cell = (time.monotonic() - start) / computed["n"] if computed["n"] else None
        ctx.progress(done, total, force=done == total, eta_s=per_cell * (total - done) if per_cell else None)

    report = evaluate_student(req, on_cell=on_cell, should_stop=ctx.should_stop, on_rows=on_rows)
    if ctx.should_stop():
        raise Cancelled
    on_rows(report.rows)  # the same rows: none is added twice
    return Outcome({"cells": report.total, "computed": report.computed, "rows_added": added["rows"],
                    "table": str(report.table), "charts": [str(c) for c in report.charts]})


# ----------------------------------------------------------------------------- export


def export(ctx: JobContext, req: ExportRequest) -> Outcome:
    out = run_export(req)
    ctx.progress(1, 1, force=True)
    if req.format == "gguf":
        return Outcome({"file": str(out), "layers": req.layers, "type": req.type, "bytes": out.stat().st_size})
    return Outcome({"folder": str(out), "layers": req.layers})


BODIES: dict[str, Callable[[JobContext, object], Outcome]] = {"distill": distill, "eval": evaluate, "export": export}
"""The body of each kind of `workers.kinds.KINDS` (a test checks that both name the same kinds)."""
