"""A family's standard evaluation as a queued job, run by real workers two ways one after the other: one worker with
every core (one job), and the same evaluation shared out (`EvalRequest.parts`) over N workers that split the cores
(`boomerang worker --threads`). Each way writes a results folder of its own, so nothing is reused between them; the
script checks that both give the same numbers (cost apart: timings) and prints the wall times and their ratio.

    python bench/bench_eval_parts.py --student DIR [--workers 2] [--threads 1]

Needs Redis (REDIS_URL, default redis://127.0.0.1:6379/14 here); the jobs table is a SQLite file in a temporary
folder. It goes through the command line as a user would (`boomerang worker`, `boomerang submit eval`) and watches
the jobs table with sqlite3. Run it with nothing else running on the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def start_worker(tmp: Path, env: dict, name: str, queue: str, threads: int) -> subprocess.Popen:
    log = tmp / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "boomerang.cli", "worker", "--name", name, "--queues", queue,
                             "--threads", str(threads)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    while "ready." not in log.read_text():
        if proc.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.2)
    return proc


def run(tmp: Path, env: dict, student: str, workers: int, threads: int, label: str) -> tuple[float, Path]:
    """Start `workers` workers of `threads` threads, queue the evaluation in `workers` parts, wait; (seconds, table)."""
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    procs = [start_worker(tmp, env, f"{label}-w{i}", queue, threads) for i in range(workers)]
    try:
        start = time.perf_counter()
        queued = subprocess.run([sys.executable, "-m", "boomerang.cli", "submit", "eval", student, "--out",
                                 str(tmp / label), "--parts", str(workers), "--queue", queue, "--limit", "100"],
                                env=env, capture_output=True, text=True, check=True).stdout
        job_id = int(re.search(r"job (\d+) queued", queued)[1])
        db = tmp / "jobs.db"
        while True:
            status, result, error = sqlite3.connect(db).execute(
                "select status, result, error from jobs where id = ?", (job_id,)).fetchone()
            if status in ("SUCCEEDED", "FAILED", "CANCELLED"):
                break
            time.sleep(1.0)
        seconds = time.perf_counter() - start
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    if status != "SUCCEEDED":
        raise SystemExit(f"{label}: job {job_id} {status}: {error}")
    result = json.loads(result)
    print(f"  {label:<34} {seconds:7.1f} s  ({result.get('parts', {'1/1': 'here'})})", flush=True)
    return seconds, Path(result["table"])


def numbers(table: Path) -> dict:
    with open(table, newline="") as f:
        return {(r["key"], r["task"], r["metric"]): r["value"] for r in csv.DictReader(f) if r["task"] != "cost"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True, help="a distilled student folder")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker when shared out")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp / 'jobs.db'}",
           "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"), "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)
    cores = os.cpu_count() or 1
    print(f"{cores} cores; the standard evaluation (100 items per task) of {args.student} (results under {tmp})")
    one, one_table = run(tmp, env, args.student, 1, cores, f"one worker, {cores} threads")
    many, many_table = run(tmp, env, args.student, args.workers, args.threads,
                           f"{args.workers} workers, {args.threads} thread(s) each")
    a, b = numbers(one_table), numbers(many_table)
    assert a.keys() == b.keys(), "the two ways measured different cells"
    differ = [k for k in a if abs(float(a[k] or "nan") - float(b[k] or "nan")) > 1e-6 * max(1.0, abs(float(a[k] or 0)))
              and not (a[k] == b[k])]
    print(f"  same numbers: {len(a) - len(differ)} of {len(a)} values equal within 1e-6"
          + (f"; differ: {differ[:5]}" if differ else ""))
    print(f"  shared out: {one / many:.2f}x one worker")


if __name__ == "__main__":
    main()
