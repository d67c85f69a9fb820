"""`boomerang worker | submit | jobs | cancel | retry`: the jobs layer's commands.

Registered into the `boomerang` command through the entry-point group "boomerang.commands". This module
is imported by every `boomerang` command (to register these): Celery and the database are imported inside
the command that uses them, not here.
"""

from __future__ import annotations

import json
import os
import sys
import time

from boomerang.errors import BoomerangError
from boomerang.progress import format_eta
from boomerang.settings import add_flags, values_from_args
from workers.kinds import KINDS


def register(sub, helpers: dict) -> None:
    p = sub.add_parser("worker", help="start one worker (one per GPU; says which device it uses)")
    p.add_argument("--queues", default="default", help="comma-separated queues to take jobs from")
    p.add_argument("--gpu", default=None, help="the GPU(s) this worker owns, e.g. 0 or 0,1 for jobs with "
                                               "processes=2 (sets CUDA_VISIBLE_DEVICES); default: CPU "
                                               "or whatever CUDA_VISIBLE_DEVICES already says")
    p.add_argument("--name", default=None, help="worker name (default host:pid)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo"],
                   help="prefork (default): the job runs in a child process, the parent never touches CUDA")
    p.add_argument("--sweep-every", type=float, default=15.0, help="seconds between sweeps for stale jobs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads this worker's jobs compute with (default: torch's, every core): with several "
                        "workers on one machine's CPU, give each its share of the cores")
    p.add_argument("--address", default=None, help="how workers on other machines reach this one (the rendezvous of a "
                                                   "queued multi-machine run whose node 0 runs here; default: the "
                                                   "host name)")
    p.set_defaults(func=cmd_worker)

    offered = {kind: row for kind, row in KINDS.items() if row.offered}
    p = sub.add_parser("submit", help=f"queue a job: {' | '.join([*offered, 'baselines'])}")
    kinds = p.add_subparsers(title="kind", required=True)
    for kind, row in offered.items():  # one per registry row: its flags from the command that shares them, or its request
        command = helpers["requests"].get(kind)
        k = kinds.add_parser(kind, help=row.help)
        if command:
            command.add_flags(k)
        else:
            add_flags(k, row.request)
        k.add_argument("--queue", default="default")
        k.set_defaults(func=cmd_submit, kind=kind,
                       build=command.from_args if command else _request_builder(row.request))
    k = kinds.add_parser("baselines", help="queue the distilled-at-size baselines of a family: one distill job per "
                                           "size, with the family's recipe, data and budget (boomerang baselines)")
    k.add_argument("student", help="the family's student folder (RUN/student)")
    k.add_argument("--sizes", default=None, help="comma-separated layer counts (default: three spread over the family)")
    k.add_argument("--queue", default="default")
    k.set_defaults(func=cmd_submit_baselines)

    p = sub.add_parser("jobs", help="every job with status and progress")
    p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    for name, func, text in (("cancel", cmd_cancel, "stop a job (a running one within one step, with a checkpoint)"),
                             ("retry", cmd_retry, "queue a FAILED or CANCELLED job again; it resumes from its checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", type=int)
        p.set_defaults(func=func)


def _request_builder(request_class):
    return lambda args: request_class.from_dict(values_from_args(args, request_class))


def cmd_worker(args) -> int:
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)  # before anything can initialise CUDA
    if args.name:
        os.environ["BOOMERANG_WORKER_NAME"] = args.name
    if args.address:
        os.environ["BOOMERANG_NODE_ADDRESS"] = args.address
    if args.threads is not None:
        if args.threads < 1:
            raise BoomerangError(f"--threads must be at least 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the processes a job starts (torchrun) too
    import torch
    from celery import signals

    from db.engine import make_engine
    from workers.app import make_celery, redis_url
    from workers.runner import start_sweeper

    app = make_celery()
    make_engine()  # migrate once, in the parent, before any child starts
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = f"GPU {gpus} (CUDA_VISIBLE_DEVICES={gpus})" if gpus not in (None, "") else "CPU"
    threads = args.threads or torch.get_num_threads()
    if args.threads is not None:  # in the process that runs jobs: a thread pool made before a fork is broken after it
        if args.pool == "solo":
            torch.set_num_threads(args.threads)
        else:
            signals.worker_process_init.connect(lambda **_: torch.set_num_threads(args.threads), weak=False)
    print(f"boomerang worker {args.name or ''} on {device} ({threads} CPU threads); queues "
          f"{args.queues}; broker {redis_url()}", flush=True)

    @signals.worker_ready.connect
    def _sweep(**_):
        start_sweeper(make_engine, app, every=args.sweep_every)

    argv = ["worker", f"--pool={args.pool}", "--concurrency=1", f"--queues={args.queues}", "--loglevel=INFO",
            "--without-gossip", "--without-mingle"]
    if args.name:
        argv.append(f"--hostname={args.name}@%h")
    app.worker_main(argv)
    return 0


def cmd_submit(args) -> int:
    from db.engine import make_engine
    from workers.broker import make_sender
    from workers.submit import submit

    settings = args.build(args).to_dict()
    job = submit(engine=make_engine(), app=make_sender(), kind=args.kind, settings=settings, queue=args.queue)
    print(f"job {job.id} queued ({job.kind}, queue {job.queue}); watch it with: boomerang jobs --watch")
    return 0


def cmd_submit_baselines(args) -> int:
    from db.engine import make_engine
    from workers.broker import make_sender
    from workers.workflows import queue_at_size

    queued = queue_at_size(engine=make_engine(), app=make_sender(), student=args.student, sizes=args.sizes,
                           queue=args.queue)
    if not queued:
        print("every distilled-at-size baseline of this family is done: boomerang eval puts them beside it")
    for cfg, job in queued:
        print(f"job {job.id} queued: a {len(cfg.keep)}-layer student distilled with the family's recipe into {cfg.out}")
    return 0


def render_jobs(jobs) -> str:
    """The job list as `boomerang jobs` prints it; what a job counts (steps, cells) is its registry row's unit."""
    lines = [f"{'id':>4}  {'kind':<7} {'status':<9} {'progress':<31} {'tok/s':>7} {'eta':>8}  {'worker':<22} info"]
    for j in jobs:
        frac = j.step / j.total if j.total else 0
        bar = "#" * int(frac * 16)
        unit = KINDS[j.kind].unit if j.kind in KINDS else "item"
        progress = f"[{bar:<16}] {unit} {j.step}/{j.total}" if j.total else "-"
        busy = j.phase if j.phase and j.phase != "training" else None  # e.g. writing the corpus: 12/32 documents
        info = j.error or busy or (f"loss {j.losses['loss']:.4f}" if j.losses.get("loss") is not None else "")
        lines.append(f"{j.id:>4}  {j.kind:<7} {j.status.value:<9} {progress:<31} "
                     f"{(j.tokens_per_s or 0):>7.0f} {format_eta(j.eta_s):>8}  {(j.worker or '-')[:22]:<22} {info[:60]}")
    return "\n".join(lines)


def cmd_jobs(args) -> int:
    from sqlmodel import Session

    from db import crud
    from db.engine import make_engine
    from db.models import JobPublic

    engine = make_engine()
    while True:
        with Session(engine) as s:
            jobs = crud.list_jobs(session=s, limit=args.limit)
        if args.json:
            print(json.dumps([JobPublic.model_validate(j).model_dump(mode="json") for j in jobs], indent=2))
            return 0
        if args.watch:
            sys.stdout.write("\x1b[2J\x1b[H")
        print(render_jobs(jobs), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(2)
        except KeyboardInterrupt:
            return 0


def cmd_cancel(args) -> int:
    from sqlmodel import Session

    from db import crud
    from db.engine import make_engine

    with Session(make_engine()) as s:
        try:
            job = crud.request_cancel(session=s, job_id=args.job_id)
        except LookupError as exc:
            raise BoomerangError(str(exc)) from None
    print(f"job {job.id}: {job.status.value}" + (" (stops within one step)" if job.status.value == "RUNNING" else ""))
    return 0


def cmd_retry(args) -> int:
    from db.engine import make_engine
    from workers.broker import make_sender
    from workers.submit import requeue

    try:
        job = requeue(engine=make_engine(), app=make_sender(), job_id=args.job_id)
    except (LookupError, ValueError) as exc:
        raise BoomerangError(str(exc)) from None
    print(f"job {job.id} queued again; it resumes from its checkpoint if it has one")
    return 0
