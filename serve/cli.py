"""`boomerang serve`: every size of one family through the OpenAI API (registered through the
"boomerang.commands" entry points).

This module is imported by every `boomerang` command (to register `serve`): the database, the web server
and the serving layer are imported inside the command that uses them, not here.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.precision import DTYPE_HELP


def register(sub, helpers: dict) -> None:
    p = sub.add_parser("serve", help="serve every size of a family through the OpenAI API (one process, one copy "
                                     "of the weights)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--student", help="a student folder")
    which.add_argument("--job", type=int, help="a finished distillation job: serve the family it made")
    p.add_argument("--host", default=os.environ.get("BOOMERANG_SERVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("BOOMERANG_SERVE_PORT", "8000")))
    p.add_argument("--api-key-file", default=os.environ.get("BOOMERANG_API_KEY_FILE"),
                   help="a file holding the key clients must send (Authorization: Bearer KEY); or set BOOMERANG_API_KEY")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running at most; past it, 429")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded at once at most (any sizes)")
    p.add_argument("--name", default=None, help="the family's name in model ids (default: from the folder)")
    p.add_argument("--order", default="best", help="patch order: best (the best measured per size, the default) | "
                   "last | first | greedy | a list")
    p.add_argument("--ends", default="student", help="whose embeddings and final norm + head the sizes between "
                   "student and teacher use: student | teacher | auto (teacher ends on the patched side)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.set_defaults(func=cmd_serve)


def student_of_job(job_id: int) -> str:
    from sqlmodel import Session

    from db import crud
    from db.engine import make_engine

    with Session(make_engine()) as s:
        job = crud.get_job(session=s, job_id=job_id)
    if job is None:
        raise BoomerangError(f"no job {job_id}")
    if not job.result.get("student_dir"):
        raise BoomerangError(f"job {job_id} is a {job.kind} job that is {job.status.value}: serve a SUCCEEDED "
                             "distillation job, or give --student DIR")
    return job.result["student_dir"]


def api_key(path: str | None) -> str | None:
    if path:
        try:
            key = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise BoomerangError(f"cannot read --api-key-file {path}: {exc.strerror}") from None
        if not key:
            raise BoomerangError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get("BOOMERANG_API_KEY") or None


def cmd_serve(args) -> int:
    import uvicorn

    from boomerang.servers import register_server
    from boomerang.student import open_family
    from serve.api import ServerState, load_in_background, make_app
    from serve.family import ServedFamily
    from serve.scheduler import Scheduler

    folder = args.student or student_of_job(args.job)
    for name, value in (("--max-queue", args.max_queue), ("--max-batch", args.max_batch)):
        if value < 1:
            raise BoomerangError(f"{name} must be at least 1, got {value}")
    state = ServerState(api_key=api_key(args.api_key_file))
    url = f"http://{args.host}:{args.port}/v1"
    record = {}

    def load():
        served = ServedFamily(open_family(folder, order=args.order, device=args.device, dtype=args.dtype,
                                          ends=args.ends), args.name)
        where = served.measure_latency()
        scheduler = Scheduler(served.build, served.tokenizer, max_queue=args.max_queue, max_batch=args.max_batch)
        record["path"] = register_server({"url": url, "family": served.name, "student": str(served.opened.folder),
                                          "sizes": {n: s.name for n, s in served.sizes.items()},
                                          "auth": state.api_key is not None})
        print(f"boomerang serve: {served.name} ({len(served.sizes)} sizes, {min(served.sizes)}..{max(served.sizes)} "
              f"layers; latency {where}) on {url}", flush=True)
        return served, scheduler

    # uvicorn stops gracefully on SIGTERM and then raises it again: this handler turns that into an exit that
    # runs the cleanup below (the server's entry in BOOMERANG_HOME/servers is removed)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    load_in_background(state, load)
    print(f"boomerang serve: loading {folder}; answering 503 until it is ready", file=sys.stderr, flush=True)
    try:
        uvicorn.run(make_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        if record.get("path"):
            record["path"].unlink(missing_ok=True)
        if state.scheduler:
            state.scheduler.close()
    return 0
