"""Job bodies: what a worker does for each kind of job, given the job's context and its typed request.

A body calls the library, turns its reports into progress and log lines, raises `Cancelled` when
asked to stop, and returns an `Outcome`: the job's result (a JSON object) and the follow-up jobs it
wants queued (the runner queues them). `BODIES` maps a kind of `workers.kinds.KINDS` to its body.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sqlmodel import Session, select

from boomerang.errors import BoomerangError
from boomerang.evaluation.run import EvalRequest, evaluate_student
from boomerang.export import ExportRequest, run_export
from boomerang.models import boomerang_home, load_teacher
from boomerang.student import open_family
from boomerang.training.checkpoint import CHECKPOINT, METRICS, RECIPE, STUDENT, checkpoint_step, truncate_metrics
from boomerang.training.loop import StepReport
from boomerang.training.loop import distill as run_distillation
from boomerang.training.parallel import NodeShare, Rendezvous, free_port, launch_processes, node_address, run_device
from boomerang.training.recipe import DistillConfig
from db import crud
from db.models import OPEN, JobStatus, Student
from workers.context import PROGRESS_EVERY_S, Cancelled, FollowUp, JobContext, Outcome, worker_name
from workers.submit import submit
from workers.workflows import register_family

# ----------------------------------------------------------------------------- distill


def run_dir_for(job, cfg: DistillConfig) -> Path:
    """The run folder: the one the job asked for, or a folder of its own under BOOMERANG_HOME."""
    asked = cfg.out != DistillConfig.out
    return Path(cfg.out if asked else boomerang_home() / "runs" / f"job-{job.id}").expanduser().resolve()


def distill(ctx: JobContext, cfg: DistillConfig) -> Outcome:
    if cfg.nnodes > 1 and not cfg.node_queues:
        raise BoomerangError(f"nnodes={cfg.nnodes}: a queued run over several machines needs node_queues, the queue of a "
                             f"worker on each other machine ({cfg.nnodes - 1}; `--node-queues Q1,...`); or start it from "
                             "the command line on each machine (docs/scale-out.md)")
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

    if cfg.nnodes > 1:
        steps_done, stopped, student_dir = _distill_on_nodes(ctx, cfg, resume, on_step)
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype)  # on the host: only to list the family's sizes
    elif cfg.processes > 1:
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


RDZV_TIMEOUT_S = int(os.environ.get("BOOMERANG_RDZV_TIMEOUT_S", "600"))
"""How long the machines of a queued multi-machine run wait for each other."""


def _distill_on_nodes(ctx: JobContext, cfg: DistillConfig, resume: bool, on_step) -> tuple[int, bool, Path | None]:
    """Node 0 of a run over `cfg.nnodes` machines: a rendezvous on this machine, a `node` job on each other machine's
    queue, then this machine's processes. A node job that fails or is cancelled takes the run down (the processes fail
    on their next collective, or stop with a checkpoint); the error names every node job's state."""
    rdzv = Rendezvous(0, f"{node_address()}:{free_port()}", RDZV_TIMEOUT_S)
    nodes: list[int] = []
    for rank, queue in enumerate(cfg.node_queues, start=1):
        share = NodeShare(recipe=cfg, node_rank=rank, rdzv=rdzv.endpoint, rdzv_timeout=rdzv.timeout, resume=resume)
        nodes.append(submit(engine=ctx.engine, app=ctx.sender(), kind="node", settings=share.to_dict(), queue=queue).id)
    ctx.log(f"node 0 of {cfg.nnodes} at {rdzv.endpoint}; nodes " + ", ".join(
        f"{r} (job {j}, queue {q})" for r, (j, q) in enumerate(zip(nodes, cfg.node_queues, strict=True), start=1)))
    try:
        return _distill_processes(ctx, cfg, resume, on_step, rdzv=rdzv)
    except BoomerangError as exc:
        with Session(ctx.engine) as s:
            states = []
            for rank, j in enumerate(nodes, start=1):
                job = crud.request_cancel(session=s, job_id=j)  # a node job still queued never joins now
                taken = f"run by {job.worker}" if job.worker else f"taken by no worker of queue {job.queue}"
                states.append(f"node {rank}: job {j} {job.status.value}, {taken}")
        raise BoomerangError(f"{exc}\n" + "; ".join(states)) from None


def node(ctx: JobContext, share: NodeShare) -> Outcome:
    """One other machine's share of a queued multi-machine run: its processes join node 0's rendezvous; the job ends
    when they do. Cancelling it stops the whole run after a step, with a checkpoint (node 0's job ends cancelled)."""
    cfg = share.recipe
    ctx.log(f"node {share.node_rank} of {cfg.nnodes} on {worker_name()} ({node_address()}): joining {share.rdzv}")
    ctx.progress(0, cfg.steps, force=True, phase=f"node {share.node_rank} of {cfg.nnodes}: joining {share.rdzv}")

    def on_step(r) -> None:
        ctx.progress(r.step, r.total, tokens_per_s=r.tokens_per_s, eta_s=r.eta_s, phase=f"node {share.node_rank} of "
                     f"{cfg.nnodes}")

    steps, stopped, _ = _distill_processes(ctx, cfg, share.resume, on_step, rdzv=share.rendezvous())
    if stopped:
        raise Cancelled
    ctx.progress(steps, cfg.steps, force=True)
    return Outcome({"node_rank": share.node_rank, "steps": steps, "run_dir": cfg.out})


def _distill_processes(ctx: JobContext, cfg: DistillConfig, resume: bool, on_step,
                       rdzv: Rendezvous | None = None) -> tuple[int, bool, Path | None]:
    """One job on several processes (GPUs): torchrun in a child, its steps read back from metrics.jsonl. With `rdzv`,
    this machine's share of a multi-machine run (node 0 writes metrics, checkpoints and the student).

    Cancelling creates the stop file the processes watch: they finish the step and checkpoint.
    """
    out = Path(cfg.out)
    rank = rdzv.node_rank if rdzv else 0
    stop = out.parent / f".{out.name}.stop{'' if rank == 0 else f'-node{rank}'}"
    stop.unlink(missing_ok=True)
    log_path = out.parent / f"{out.name}{'' if rank == 0 else f'.node{rank}'}.log"
    seen = {"step": 0, "offset": 0}
    if resume and rank == 0:  # lines past the checkpoint (all of them, without one) will be written again
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
        def launch() -> None:
            try:
                result["rc"] = launch_processes(cfg, resume=resume, stop_file=str(stop), log=log, rdzv=rdzv)
            except BoomerangError as exc:  # e.g. machines that never all met: its own words, not the log's end
                result["error"] = exc

        runner = threading.Thread(target=launch, daemon=True)
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
    if "error" in result:
        raise result["error"]
    if result.get("rc") != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        ours = list(dict.fromkeys(line for line in lines if line.startswith("error: ")))  # our processes' own errors
        detail = "\n".join(ours) if ours else "the end of the log:\n" + "\n".join(lines[-15:])
        raise BoomerangError(f"the {cfg.processes} distillation processes failed (exit {result.get('rc')}; "
                             f"output in {log_path})\n{detail}")
    if rank > 0:  # node 0 writes the student: this machine's share ended cleanly with its processes
        return seen["step"], stopped, None
    student = out / STUDENT
    if not stopped and not (student / "boomerang.json").is_file():
        raise BoomerangError(f"the distillation processes ended without writing {student}; see {log_path}")
    return seen["step"], stopped, None if stopped else student


# ----------------------------------------------------------------------------- evaluate


def evaluate(ctx: JobContext, req: EvalRequest) -> Outcome:
    if req.parts > 1:
        return _evaluate_in_parts(ctx, req)
    return _evaluate_here(ctx, req)


def _evaluate_here(ctx: JobContext, req: EvalRequest, *, on_progress=None) -> Outcome:
    """The evaluation (or one part of it) in this worker. `on_progress(done, total, eta_s)`: instead of the job's own
    progress (a part run by the job that shares the evaluation out)."""
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
        eta = per_cell * (total - done) if per_cell else None
        if on_progress:
            on_progress(done, total, eta)
        else:
            ctx.progress(done, total, force=done == total, eta_s=eta)

    ctx.log(f"evaluating{' part ' + req.part if req.part else ''} on {worker_name()} with {torch.get_num_threads()} "
            "CPU threads")
    report = evaluate_student(req, on_cell=on_cell, should_stop=ctx.should_stop, on_rows=on_rows)
    if ctx.should_stop():
        raise Cancelled
    on_rows(report.rows)  # the same rows: none is added twice
    if report.table is None:  # one part: the job that shared the evaluation out writes the report
        return Outcome({"part": req.part, "cells": report.total, "computed": report.computed,
                        "rows_added": added["rows"]})
    return Outcome({"cells": report.total, "computed": report.computed, "rows_added": added["rows"],
                    "table": str(report.table), "charts": [str(c) for c in report.charts]})


PART_POLL_S = 1.0


def _evaluate_in_parts(ctx: JobContext, req: EvalRequest) -> Outcome:
    """An evaluation shared out over `req.parts` jobs (`share_out`): this job queues parts 2..N for the other workers
    of its queue, computes part 1, then each part no worker has claimed yet (taken back: it runs here) or whose job
    failed or was cancelled (its missing cells), waits for the parts running elsewhere, and gathers: the same request
    in one piece finds every part's cells on disk, measures cost alone (no timing is taken while parts compute) and
    writes the report. Cancelling this job cancels the parts. A job resumed after its worker died finds its parts'
    jobs still open and waits for them instead of queueing them again."""
    n, me = req.parts, ctx.job.id
    part_of = {i: dataclasses.replace(req, parts=1, part=f"{i}/{n}") for i in range(1, n + 1)}
    helpers = _part_jobs(ctx, part_of)
    where = {1: "here", **{i: f"job {j}" if j else "here" for i, j in helpers.items()}}
    ctx.log(f"shared out over {n} parts: " + ", ".join(f"{i}/{n} {w}" for i, w in where.items()))
    report = _PartsProgress(ctx, n, helpers)

    def show(i: int):
        def progress(done, total, eta):
            report.here[i] = (done, total)
            report(eta)
        return progress

    def cancel_parts() -> None:
        with Session(ctx.engine) as s:
            for j in helpers.values():
                if j:
                    crud.request_cancel(session=s, job_id=j)

    def compute(i: int) -> None:
        try:
            _evaluate_here(ctx, part_of[i], on_progress=show(i))
        except Cancelled:
            cancel_parts()
            raise

    compute(1)
    pending = dict(helpers)
    while pending:
        for i, j in list(pending.items()):
            with Session(ctx.engine) as s:
                taken = j is None or crud.take_back(session=s, job_id=j, note=f"no worker took it: job {me} computed it")
                job = None if taken else crud.get_job(session=s, job_id=j)
            if taken:
                ctx.log(f"part {i}/{n}: no other worker free, computed here")
                where[i] = "here" + (f" (job {j} taken back)" if j else "")
                compute(i)
            elif job is None or job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                state = job.status.value.lower() if job else "gone"
                ctx.log(f"part {i}/{n}: job {j} {state}" + (f" ({job.error or 'no error'})" if job else "")
                        + "; its missing cells are computed here")
                where[i] = f"here (job {j} {state})"
                compute(i)
            elif job.status != JobStatus.SUCCEEDED:
                continue
            del pending[i]
        if ctx.should_stop():
            cancel_parts()
            raise Cancelled
        report()
        if pending:
            time.sleep(PART_POLL_S)
    gathered = _evaluate_here(ctx, dataclasses.replace(req, parts=1))
    return Outcome({**gathered.result, "parts": {f"{i}/{n}": w for i, w in where.items()}})


def _part_jobs(ctx: JobContext, part_of: dict[int, EvalRequest]) -> dict[int, int | None]:
    """{part: its job id} for parts 2..N: an open job with the same settings (queued by this job before its worker
    died), else a new one on this job's queue; None where none could be queued (this job computes it)."""
    with Session(ctx.engine) as s:
        open_jobs = [j for j in crud.list_jobs(session=s, limit=500) if j.kind == "eval" and j.status in OPEN]
    out: dict[int, int | None] = {}
    for i, request in part_of.items():
        if i == 1:
            continue
        settings = request.to_dict()
        found = next((j.id for j in open_jobs if j.settings == settings), None)
        if found is None:
            found = ctx.queue_job("eval", settings, f"part {i}/{len(part_of)}", instead="it is computed here")
        out[i] = found
    return out


class _PartsProgress:
    """The shared-out job's progress: cells done over cells planned, over every part (a part not started counts 0/0).
    The parts computed elsewhere are read from their job rows at most every PROGRESS_EVERY_S, like the writes."""

    def __init__(self, ctx: JobContext, n: int, helpers: dict[int, int | None]):
        self.ctx, self.n, self.helpers = ctx, n, helpers
        self.here: dict[int, tuple[int, int]] = {}
        self.elsewhere: dict[int, tuple[int, int]] = {}
        self.read_at = -float("inf")

    def __call__(self, eta_s=None) -> None:
        if time.monotonic() - self.read_at >= PROGRESS_EVERY_S:
            with Session(self.ctx.engine) as s:
                for i, j in self.helpers.items():
                    if j and i not in self.here:  # a part computed here counts its own cells
                        job = crud.get_job(session=s, job_id=j)
                        self.elsewhere[i] = (job.step, job.total) if job else (0, 0)
            self.read_at = time.monotonic()
        counts = {**self.elsewhere, **self.here}
        done, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        text = ", ".join(f"{i}/{self.n} {c[0]}/{c[1]}" for i, c in sorted(counts.items()))
        self.ctx.progress(done, total, eta_s=eta_s, phase=f"parts (cells done / planned): {text}")


# ----------------------------------------------------------------------------- export


def export(ctx: JobContext, req: ExportRequest) -> Outcome:
    out = run_export(req)
    ctx.progress(1, 1, force=True)
    if req.format == "gguf":
        return Outcome({"file": str(out), "layers": req.layers, "type": req.type, "bytes": out.stat().st_size})
    return Outcome({"folder": str(out), "layers": req.layers})


BODIES: dict[str, Callable[[JobContext, object], Outcome]] = {"distill": distill, "eval": evaluate, "export": export,
                                                             "node": node}
"""The body of each kind of `workers.kinds.KINDS` (a test checks that both name the same kinds)."""
