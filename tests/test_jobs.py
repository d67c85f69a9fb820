"""Jobs against a real Redis and real worker processes (started here, stopped after)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlmodel import Session, select

from boomerang.errors import BoomerangError
from db import crud
from db.engine import make_engine
from db.models import JobStatus
from tiny import save_tiny_teacher
from workers.app import make_celery
from workers.submit import submit

REDIS_URL = os.environ.get("BOOMERANG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEXT = "A small corpus for a tiny teacher, repeated so there are enough blocks. " * 200


@pytest.fixture(scope="module")
def redis_ready():
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"these tests need a real Redis at {REDIS_URL} (.ci/run starts one): {exc}")


class Cluster:
    """A database, a Redis queue of our own, and worker processes started on demand."""

    def __init__(self, tmp: Path, database_url: str | None = None):
        self.tmp, self.queue = tmp, f"q-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "DATABASE_URL": database_url or f"sqlite:///{tmp / 'jobs.db'}", "REDIS_URL": REDIS_URL,
                    "BOOMERANG_HOME": str(tmp / "home"), "BOOMERANG_HEARTBEAT_S": "0.5",
                    "BOOMERANG_STALE_AFTER_S": "3", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.engine = make_engine(self.env["DATABASE_URL"])
        self.app = make_celery(REDIS_URL)
        self.workers: dict[str, subprocess.Popen] = {}
        save_tiny_teacher(tmp / "teacher", "llama")
        (tmp / "corpus.txt").write_text(TEXT)

    def start_worker(self, name: str, queues: str | None = None, *flags: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "boomerang.cli", "worker", "--name", name, "--queues", queues or self.queue,
                                 "--sweep-every", "1", *flags], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.workers[name] = proc
        deadline = time.time() + 60
        while "ready." not in (self.tmp / f"{name}.log").read_text():
            assert proc.poll() is None, (self.tmp / f"{name}.log").read_text()
            assert time.time() < deadline, "worker did not start"
            time.sleep(0.2)
        return proc

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.workers.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.workers):
            try:
                self.kill(name, signal.SIGTERM)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill(name, signal.SIGKILL)

    def distill(self, queue: str | None = None, **kw):
        settings = dict(teacher=str(self.tmp / "teacher"), data=str(self.tmp / "corpus.txt"), steps=6, batch_size=2,
                        seq_len=16, lr=1e-3, checkpoint_every=5)
        settings.update(kw)
        return submit(engine=self.engine, app=self.app, kind="distill", settings=settings, queue=queue or self.queue)

    def job(self, job_id):
        with Session(self.engine) as s:
            return crud.get_job(session=s, job_id=job_id)

    def steps(self, job_id):
        with Session(self.engine) as s:
            return [m.step for m in crud.steps_of(session=s, job_id=job_id)]

    def wait(self, job_id, until, timeout=120, every=0.1):
        deadline, seen = time.time() + timeout, []
        while time.time() < deadline:
            job = self.job(job_id)
            seen.append((job.status, job.step, len(self.steps(job_id))))
            if until(job):
                return job, seen
            time.sleep(every)
        logs = "\n".join(p.read_text()[-3000:] for p in self.tmp.glob("*.log"))
        raise AssertionError(f"job {job_id} stuck at {seen[-1]}\n{logs}")


@pytest.fixture
def cluster(tmp_path, redis_ready, monkeypatch):
    c = Cluster(tmp_path)
    for key in ("DATABASE_URL", "REDIS_URL", "BOOMERANG_HOME"):  # the CLI commands run in this process see them
        monkeypatch.setenv(key, c.env[key])
    yield c
    c.stop()


def test_a_distill_job_goes_queued_running_succeeded_with_progress(cluster):
    job = cluster.distill(steps=40)
    assert cluster.job(job.id).status == JobStatus.QUEUED
    cluster.start_worker("w1")
    done, seen = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED))
    assert done.status == JobStatus.SUCCEEDED, done.error
    running = [s for s in seen if s[0] == JobStatus.RUNNING]
    assert running and any(0 < step < 40 and rows > 0 for _, step, rows in running), "no progress seen while running"
    assert cluster.steps(job.id) == list(range(1, 41))
    assert done.step == done.total == 40 and done.worker.startswith("w1") and done.attempts == 1
    assert "step 40/40" in done.log
    student = Path(done.result["student_dir"])
    assert (student / "boomerang.json").is_file()
    with Session(cluster.engine) as s:
        students = crud.list_students(session=s)
        assert [st.folder for st in students] == [str(student)]
        assert [z.n_layers for z in crud.sizes_of(session=s, student_id=students[0].id)] == [5, 6, 7, 8]


def test_cancel_a_running_job_and_a_failing_job_does_not_stop_the_worker(cluster):
    cluster.start_worker("w1")
    long = cluster.distill(steps=100000, checkpoint_every=1000)
    cluster.wait(long.id, lambda j: j.step >= 3)
    with Session(cluster.engine) as s:
        crud.request_cancel(session=s, job_id=long.id)
    done, _ = cluster.wait(long.id, lambda j: j.status != JobStatus.RUNNING)
    assert done.status == JobStatus.CANCELLED and 3 <= done.step < 100000
    assert (Path(done.run_dir) / "checkpoint.pt").is_file(), "cancel must leave a checkpoint"
    # a job that fails at run time: its data disappears after it was accepted
    (cluster.tmp / "doomed.txt").write_text(TEXT)
    bad = cluster.distill(data=str(cluster.tmp / "doomed.txt"))
    (cluster.tmp / "doomed.txt").unlink()
    good = cluster.distill(steps=3)
    failed, _ = cluster.wait(bad.id, lambda j: j.status not in (JobStatus.QUEUED, JobStatus.RUNNING))
    assert failed.status == JobStatus.FAILED and "data not found" in failed.error and "doomed.txt" in failed.error
    ok, _ = cluster.wait(good.id, lambda j: j.status not in (JobStatus.QUEUED, JobStatus.RUNNING))
    assert ok.status == JobStatus.SUCCEEDED


def test_sigkill_mid_job_resumes_from_checkpoint_on_a_new_worker(cluster):
    steps = 400
    cluster.start_worker("doomed")
    job = cluster.distill(steps=steps, checkpoint_every=20)
    cluster.wait(job.id, lambda j: j.step >= 60, every=0.05)
    cluster.kill("doomed")  # SIGKILL to the whole worker: parent and the child running the job
    killed_at = cluster.job(job.id).step
    assert cluster.job(job.id).status == JobStatus.RUNNING and killed_at < steps
    cluster.start_worker("rescuer")
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=240)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.attempts == 2 and done.worker.startswith("rescuer")
    assert cluster.steps(job.id) == list(range(1, steps + 1)), "a step's metrics were lost or duplicated"
    # it went on from the last checkpoint before the kill, not from the start
    assert 20 <= done.result["resumed_from"] <= killed_at and done.result["resumed_from"] % 20 == 0
    metrics = (Path(done.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == steps


def test_two_workers_on_one_queue_take_two_jobs_at_once(cluster):
    cluster.start_worker("a")
    cluster.start_worker("b")
    jobs = [cluster.distill(steps=100000, checkpoint_every=1000) for _ in range(2)]
    deadline = time.time() + 60
    while time.time() < deadline:
        states = [cluster.job(j.id) for j in jobs]
        if all(s.status == JobStatus.RUNNING and s.step > 0 for s in states):
            break
        time.sleep(0.2)
    assert {s.worker.split("@")[0] for s in states} == {"a", "b"}, [(s.status, s.worker) for s in states]
    with Session(cluster.engine) as s:
        for j in jobs:
            crud.request_cancel(session=s, job_id=j.id)
    for j in jobs:
        cluster.wait(j.id, lambda x: x.status == JobStatus.CANCELLED)


def test_bad_input_is_rejected_before_queueing(cluster):
    r = redis.Redis.from_url(REDIS_URL)
    before = r.llen(cluster.queue)
    cases = [
        (dict(teacher=str(cluster.tmp / "no-such-teacher")), "teacher folder not found"),
        (dict(keep=[1, 2]), "must keep layer 0"),
        (dict(data=str(cluster.tmp / "missing.txt")), "data not found"),
        (dict(steps=-3), "steps must be 0 or more"),
    ]
    for kw, message in cases:
        with pytest.raises(BoomerangError, match=message):
            cluster.distill(**kw)
    with Session(cluster.engine) as s:
        assert crud.list_jobs(session=s) == []
    assert r.llen(cluster.queue) == before


def test_redis_down_at_submit_leaves_no_row(cluster):
    app = make_celery("redis://127.0.0.1:9/0")
    with pytest.raises(BoomerangError, match="could not queue the job: Redis .* unreachable"):
        submit(engine=cluster.engine, app=app, kind="distill",
               settings=dict(teacher=str(cluster.tmp / "teacher"), data=str(cluster.tmp / "corpus.txt"), steps=1))
    with Session(cluster.engine) as s:
        assert crud.list_jobs(session=s) == []


def test_jobs_cli_submit_list_cancel_retry(cluster, capsys):
    import json

    from boomerang.cli import main

    assert main(["submit", "distill", "--teacher", str(cluster.tmp / "teacher"), "--data", str(cluster.tmp / "corpus.txt"),
                 "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--queue", cluster.queue]) == 0
    assert "job 1 queued (distill" in capsys.readouterr().out
    assert main(["jobs", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["status"] == "QUEUED" and listed["settings"]["steps"] == 2
    assert main(["cancel", "1"]) == 0 and "CANCELLED" in capsys.readouterr().out
    assert main(["retry", "1"]) == 0 and "queued again" in capsys.readouterr().out
    assert main(["jobs"]) == 0 and "QUEUED" in capsys.readouterr().out
    assert main(["cancel", "77"]) == 2 and "no job 77" in capsys.readouterr().err
    assert main(["submit", "distill", "--keep", "3,4", "--teacher", str(cluster.tmp / "teacher"),
                 "--queue", cluster.queue]) == 2
    assert "must keep layer 0" in capsys.readouterr().err


def test_distilled_at_size_baselines_are_queued_from_the_cli_and_run_by_a_worker(cluster, capsys):
    from boomerang.cli import main

    run = cluster.tmp / "run"
    assert main(["distill", "--recipe", "paper", "--teacher", str(cluster.tmp / "teacher"), "--data",
                 str(cluster.tmp / "corpus.txt"), "--steps", "3", "--seq-len", "16", "--batch-size", "2",
                 "--device", "cpu", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["submit", "baselines", str(run / "student"), "--sizes", "6,7", "--queue", cluster.queue]) == 0
    printed = capsys.readouterr().out
    assert "job 1 queued: a 6-layer student" in printed and "job 2 queued: a 7-layer student" in printed
    cluster.start_worker("w1")
    for job_id in (1, 2):
        done, _ = cluster.wait(job_id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED))
        assert done.status == JobStatus.SUCCEEDED, done.error
    for n in (6, 7):
        recipe = json.loads((run / "at-size" / str(n) / "recipe.json").read_text())
        assert len(recipe["keep"]) == n and recipe["steps"] == 3 and (run / "at-size" / str(n) / "student").is_dir()
    assert main(["submit", "baselines", str(run / "student"), "--sizes", "6,7", "--queue", cluster.queue]) == 0
    assert "every distilled-at-size baseline of this family is done" in capsys.readouterr().out


def test_jobs_are_routed_by_queue(cluster):
    """Scale-out: a worker takes only the queues it listens to (e.g. one queue per GPU type)."""
    big, small = cluster.queue + "-a100", cluster.queue + "-t4"
    cluster.start_worker("on-a100", queues=big)
    cluster.start_worker("on-t4", queues=small)
    jobs = {"on-a100": cluster.distill(queue=big, steps=3), "on-t4": cluster.distill(queue=small, steps=3)}
    for worker, job in jobs.items():
        done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED))
        assert done.status == JobStatus.SUCCEEDED and done.worker.startswith(worker) and done.queue in (big, small)


def test_a_job_on_two_processes_shows_progress_cancels_with_a_checkpoint_and_resumes(cluster):
    # a worker runs the job as torchrun with two processes (gloo on this CPU; one per GPU on a GPU
    # machine), FSDP-sharded; its steps reach the database while it runs, a cancel stops both
    # processes after a step with a checkpoint, and a retry goes on from there to the end.
    from workers.submit import requeue

    cluster.start_worker("w1")
    job = cluster.distill(steps=150, checkpoint_every=1000, processes=2, fsdp=True)
    cluster.wait(job.id, lambda j: j.step >= 3, timeout=180)
    with Session(cluster.engine) as s:
        crud.request_cancel(session=s, job_id=job.id)
    done, _ = cluster.wait(job.id, lambda j: j.status != JobStatus.RUNNING, timeout=120)
    assert done.status == JobStatus.CANCELLED, done.error
    stopped_at = done.step
    assert 3 <= stopped_at < 150 and cluster.steps(job.id) == list(range(1, stopped_at + 1))
    assert (Path(done.run_dir) / "checkpoint.pt").is_file(), "cancel must leave a checkpoint"
    run_dir = Path(done.run_dir)
    assert json.loads((run_dir / "recipe.json").read_text())["processes"] == 2
    assert (run_dir.parent / f"{run_dir.name}.log").is_file(), "the processes' output is kept beside the run"
    requeue(engine=cluster.engine, app=cluster.app, job_id=job.id)
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=240)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.result["resumed_from"] == stopped_at
    assert cluster.steps(job.id) == list(range(1, 151)), "a step's metrics were lost or duplicated"
    assert (Path(done.result["student_dir"]) / "boomerang.json").is_file()


def test_a_job_on_two_processes_that_fail_fails_with_their_output_and_the_worker_goes_on(cluster):
    cluster.start_worker("w1")
    job = cluster.distill(steps=5, processes=2)
    (cluster.tmp / "corpus.txt").write_text("")  # accepted, then emptied: both processes fail at start
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=180)
    assert done.status == JobStatus.FAILED and "distillation processes failed" in done.error
    assert "empty" in done.error, done.error
    (cluster.tmp / "corpus.txt").write_text(TEXT)
    again = cluster.distill(steps=3)
    done, _ = cluster.wait(again.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=120)
    assert done.status == JobStatus.SUCCEEDED, done.error


def shared_out_evaluation(cluster, parts: int):
    """A tiny family's evaluation (7 models: 3 sizes, both baselines at 2 sizes; a task, held-out text, cost) queued
    shared out over `parts` jobs, and the same request run in this process in one piece, for reference."""
    from test_eval import write_eval_files

    from boomerang.cli import main
    from boomerang.evaluation.run import EvalRequest, evaluate_student

    main(["cut", "--teacher", str(cluster.tmp / "teacher"), "--out", str(cluster.tmp / "student")])
    (cluster.tmp / "held.txt").write_text("Held-out text for label-free metrics. " * 80)
    settings = dict(student=str(cluster.tmp / "student"), tasks=["quiz"], data_dir=str(write_eval_files(cluster.tmp / "data")),
                    baselines=["undistilled", "drop-bi"], heldout_data=str(cluster.tmp / "held.txt"), cost=True,
                    sizes="5,7,8", dtype="float32")
    one = evaluate_student(EvalRequest(**settings, out=str(cluster.tmp / "one")))
    job = submit(engine=cluster.engine, app=cluster.app, kind="eval", settings={**settings, "parts": parts,
                                                                                "out": str(cluster.tmp / "shared")},
                 queue=cluster.queue)
    return job, one


def values(rows, *, cost: bool = False) -> dict:
    return {(r["key"], r["task"], r["metric"]): r["value"] for r in rows if (r["task"] == "cost") == cost}


def test_an_evaluation_shared_out_over_two_workers_equals_one_process(cluster):
    """Two workers (one CPU thread, two): the job asked for computes the family's part and the other worker the
    baselines' at the same time; the report gathers both, with the same numbers as one process, each cell's rows
    once in the database, and every cost cell timed by the gathering job after the parts."""
    from db.models import EvalResult

    cluster.start_worker("w1", None, "--threads", "1")
    cluster.start_worker("w2", None, "--threads", "2")
    job, one = shared_out_evaluation(cluster, parts=2)
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=240)
    assert done.status == JobStatus.SUCCEEDED, done.error
    part = int(done.result["parts"]["2/2"].removeprefix("job "))
    helper = cluster.job(part)
    assert done.result["parts"]["1/2"] == "here" and helper.status == JobStatus.SUCCEEDED, (done.result, helper.error)
    assert {done.worker.split("@")[0], helper.worker.split("@")[0]} == {"w1", "w2"}, "the part ran beside, not after"
    assert helper.settings["part"] == "2/2" and helper.result["computed"] == helper.result["cells"] > 0
    threads = 1 if helper.worker.startswith("w1") else 2  # a worker's jobs compute with the threads it was given
    assert f"evaluating part 2/2 on {helper.worker} with {threads} CPU threads" in helper.log, helper.log
    rows = read_table(Path(done.result["table"]))
    assert values(rows).keys() == values(one.rows).keys() and len(values(rows)) == len(rows) - len(values(rows, cost=True))
    for key, value in values(one.rows).items():
        assert values(rows)[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert values(rows, cost=True).keys() == values(one.rows, cost=True).keys()
    with Session(cluster.engine) as s:
        stored = list(s.exec(select(EvalResult)))
    idents = [(r.model_key, r.task, r.metric, r.cell) for r in stored]
    measured = [r for r in rows if r["value"] == r["value"]]  # NaN: not measured, not stored
    assert len(idents) == len(set(idents)) == len(measured), "a cell's rows are stored once"
    by_job = {r.job_id for r in stored if r.task == "cost"}
    assert by_job == {done.id}, "cost is timed by the gathering job alone"
    assert {r.job_id for r in stored if r.task != "cost"} == {done.id, part}


def test_parts_no_worker_takes_are_taken_back_and_computed_by_the_job_itself(cluster):
    """One worker: the parts it would wait for are taken back (cancelled before any worker claims them) and computed
    by the job itself; the numbers are those of one process all the same."""
    cluster.start_worker("w1")
    job, one = shared_out_evaluation(cluster, parts=3)
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=240)
    assert done.status == JobStatus.SUCCEEDED, done.error
    for i in (2, 3):
        where = done.result["parts"][f"{i}/3"]
        assert where.startswith("here (job ") and where.endswith(" taken back)"), done.result
        helper = cluster.job(int(where.split()[2]))
        assert helper.status == JobStatus.CANCELLED and "computed it" in helper.error and helper.worker is None
    rows = read_table(Path(done.result["table"]))
    for key, value in values(one.rows).items():
        assert values(rows)[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_a_queued_run_over_two_machines_is_joined_by_a_worker_on_each_and_equals_one_process(cluster):
    """Two workers, each on a queue of its own, stand for two machines (loopback, gloo, one process each): the job on
    node 0's queue queues a node job on the other machine's; both join, and the run equals one process on the same
    global batch (losses within 1e-4 relative, final weights within 1e-4)."""
    from torch.testing import assert_close

    from boomerang.training.loop import distill
    from boomerang.training.recipe import DistillConfig

    m0, m1 = cluster.queue + "-m0", cluster.queue + "-m1"
    cluster.start_worker("m0", m0, "--address", "127.0.0.1")
    cluster.start_worker("m1", m1, "--address", "127.0.0.1")
    job = cluster.distill(queue=m0, steps=5, checkpoint_every=2, device="cpu", nnodes=2, node_queues=[m1])
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=300)
    assert done.status == JobStatus.SUCCEEDED, done.error
    with Session(cluster.engine) as s:
        nodes = [j for j in crud.list_jobs(session=s) if j.kind == "node"]
    assert len(nodes) == 1 and nodes[0].status == JobStatus.SUCCEEDED, [(n.status, n.error) for n in nodes]
    assert done.worker.startswith("m0") and nodes[0].worker.startswith("m1") and nodes[0].queue == m1
    assert nodes[0].settings["node_rank"] == 1 and nodes[0].settings["rdzv"].startswith("127.0.0.1:")
    assert cluster.steps(job.id) == [1, 2, 3, 4, 5] and nodes[0].step == 5
    run_dir = Path(done.run_dir)
    settings = dict(teacher=str(cluster.tmp / "teacher"), data=str(cluster.tmp / "corpus.txt"), steps=5, batch_size=4,
                    seq_len=16, lr=1e-3, checkpoint_every=2, device="cpu", out=str(cluster.tmp / "one"))
    distill(DistillConfig(**settings))
    one = [json.loads(line) for line in (cluster.tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    import torch

    wa = torch.load(cluster.tmp / "one" / "checkpoint.pt", weights_only=True)["student"]
    wb = torch.load(run_dir / "checkpoint.pt", weights_only=True)["student"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)
    with Session(cluster.engine) as s:
        assert [st.folder for st in crud.list_students(session=s)] == [done.result["student_dir"]]


@pytest.mark.slow  # waits out a rendezvous timeout; the command line's own timeout is in the default suite
def test_a_queued_run_whose_other_machine_has_no_worker_fails_naming_its_queue(cluster):
    m0, nowhere = cluster.queue + "-m0", cluster.queue + "-nobody"
    cluster.env["BOOMERANG_RDZV_TIMEOUT_S"] = "10"
    cluster.start_worker("m0", m0, "--address", "127.0.0.1")
    job = cluster.distill(queue=m0, steps=5, device="cpu", nnodes=2, node_queues=[nowhere])
    done, _ = cluster.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=180)
    assert done.status == JobStatus.FAILED
    assert "did not complete within 10 s: 1 of 2 machines joined" in done.error, done.error
    assert f"taken by no worker of queue {nowhere}" in done.error, done.error
    with Session(cluster.engine) as s:
        nodes = [j for j in crud.list_jobs(session=s) if j.kind == "node"]
    assert [n.status for n in nodes] == [JobStatus.CANCELLED]
    with pytest.raises(BoomerangError, match="node_queues names the queue of each machine but node 0's: 1"):
        cluster.distill(queue=m0, nnodes=2, node_queues=["a", "b"])


def read_table(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [{**r, "value": float(r["value"])} for r in csv.DictReader(f)]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def any_database(request, tmp_path):
    """A fresh database of each kind: a SQLite file, or a new database on the local PostgreSQL server (a minute
    of repeated kills: in the slow run; the default suite runs PostgreSQL through tests/test_db.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    import psycopg

    admin_url = os.environ.get("BOOMERANG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"boomerang_fault_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(admin_url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


def test_repeated_sigkills_lose_no_step_and_no_run(tmp_path, redis_ready, any_database, monkeypatch):
    """Kill the worker's whole process group before the first checkpoint, right after a checkpoint and mid-run:
    the job still succeeds, its step rows are exactly 1..N and equal metrics.jsonl, one student, no temporary files."""
    from boomerang.training.checkpoint import checkpoint_step

    c = Cluster(tmp_path, any_database)
    for key in ("DATABASE_URL", "REDIS_URL", "BOOMERANG_HOME"):
        monkeypatch.setenv(key, c.env[key])
    steps, every = 2000, 800  # tiny steps run at ~100/s here; progress reaches the database every 2 s
    try:
        c.start_worker("w0")
        job = c.distill(steps=steps, checkpoint_every=every)
        run_dir = lambda: Path(c.job(job.id).run_dir)  # noqa: E731

        def kill_and_replace(n):
            c.kill(f"w{n}")
            c.start_worker(f"w{n + 1}")

        # 1. before the first checkpoint: the run has a recipe and no checkpoint
        c.wait(job.id, lambda j: j.step >= 1, every=0.02)
        assert not (run_dir() / "checkpoint.pt").exists()
        kill_and_replace(0)
        # 2. right after a checkpoint is written
        c.wait(job.id, lambda j: (run_dir() / "checkpoint.pt").is_file(), timeout=180, every=0.01)
        kill_and_replace(1)
        assert checkpoint_step(run_dir() / "checkpoint.pt") >= every
        # 3. in the middle of the second stretch
        c.wait(job.id, lambda j: j.status == JobStatus.RUNNING and j.step >= every + 300 and j.attempts >= 3,
               timeout=180, every=0.02)
        kill_and_replace(2)
        done, _ = c.wait(job.id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=300)
        assert done.status == JobStatus.SUCCEEDED, done.error
        assert done.attempts == 4 and done.worker.startswith("w3")
        assert c.steps(job.id) == list(range(1, steps + 1)), "a step's metrics were lost or duplicated"
        metrics = [json.loads(line) for line in (run_dir() / "metrics.jsonl").read_text().splitlines()]
        with Session(c.engine) as s:
            rows = crud.steps_of(session=s, job_id=job.id)
            students = crud.list_students(session=s)
        assert [m["step"] for m in metrics] == [r.step for r in rows]
        assert [m["loss"] for m in metrics] == pytest.approx([r.loss for r in rows], rel=1e-9)
        assert len(students) == 1 and Path(students[0].folder) == run_dir() / "student"
        leftovers = [p for p in Path(c.env["BOOMERANG_HOME"]).rglob("*") if p.name.startswith(".")]
        assert not leftovers, leftovers
    finally:
        c.stop()
