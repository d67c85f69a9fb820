"""The database layer on SQLite and on the local PostgreSQL server."""

import datetime as dt
import os
import uuid

import psycopg
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from db import crud
from db.engine import current_revision, database_url, make_engine
from db.models import JobCreate, JobStatus, StepMetric, utcnow

PG_ADMIN = os.environ.get("BOOMERANG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        yield make_engine(f"sqlite:///{tmp_path / 'test.db'}")
        return
    name = f"boomerang_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"these tests need the local PostgreSQL server ({PG_ADMIN}; .ci/run starts it): {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    eng = make_engine(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
    yield eng
    eng.dispose()
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


def new_job(session, **settings):
    return crud.create_job(session=session, job_in=JobCreate(kind="distill", settings=settings or {"steps": 1}))


def test_migrations_bring_an_empty_database_to_head(engine):
    assert current_revision(engine) == "0004"
    tables = set(inspect(engine).get_table_names())
    assert {"teachers", "jobs", "students", "sizes", "eval_results", "step_metrics", "alembic_version"} <= tables
    make_engine(engine.url.render_as_string(hide_password=False))  # upgrading again is a no-op
    assert current_revision(engine) == "0004"


def test_loss_terms_migration_keeps_old_step_rows_and_queued_jobs(engine):
    from db.engine import upgrade

    url = engine.url.render_as_string(hide_password=False)
    with engine.begin() as conn:  # back to the schema before loss terms by name, with rows of that time
        conn.execute(text("DELETE FROM alembic_version"))
        for table in ("step_metrics", "sizes", "eval_results", "students", "jobs", "teachers"):
            conn.execute(text(f"DROP TABLE {table}"))
        if engine.dialect.name == "postgresql":
            conn.execute(text("DROP TYPE IF EXISTS jobkind")), conn.execute(text("DROP TYPE jobstatus"))
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (kind, settings, queue, status, step, total, losses, log, attempts, "
                          "cancel_requested, result, created_at) VALUES ('DISTILL', :s, 'default', 'QUEUED', 0, 0, "
                          "'{}', '', 0, false, '{}', :now)"), {"s": '{"steps": 3, "out": null}', "now": utcnow()})
        conn.execute(text("INSERT INTO step_metrics (job_id, step, loss, ce, kl, cosine, mse, lr, grad_norm, tokens, "
                          "tokens_per_s) VALUES (1, 1, 2.5, 1.5, 0.5, 0.25, 0, 1e-4, 1.0, 32, 10.0)"))
    engine = make_engine(url)
    assert current_revision(engine) == "0004"
    with Session(engine) as s:
        (row,) = crud.steps_of(session=s, job_id=1)
        assert row.loss == 2.5 and row.terms == {"ce": 1.5, "kl": 0.5, "cosine": 0.25}  # a term that was off is gone
        assert crud.get_job(session=s, job_id=1).settings == {"steps": 3, "out": "runs/distill"}
        assert crud.get_job(session=s, job_id=1).kind == "distill"  # the enum's DISTILL, as the registry names it
    assert "ce" not in {c["name"] for c in inspect(engine).get_columns("step_metrics")}


def test_claim_is_exclusive_until_the_heartbeat_goes_stale(engine):
    with Session(engine) as s:
        job = new_job(s)
        stale = dt.timedelta(seconds=30)
        assert crud.claim_job(session=s, job_id=job.id, worker="a", stale_after=stale)
        assert not crud.claim_job(session=s, job_id=job.id, worker="b", stale_after=stale)
        assert crud.heartbeat(session=s, job_id=job.id, worker="a")
        assert not crud.heartbeat(session=s, job_id=job.id, worker="b")
        crud.update_progress(session=s, job_id=job.id, heartbeat_at=utcnow() - dt.timedelta(minutes=5))
        assert [j.id for j in crud.stale_jobs(session=s, stale_after=stale)] == [job.id]
        assert crud.claim_job(session=s, job_id=job.id, worker="b", stale_after=stale)
        s.expire_all()
        job = crud.get_job(session=s, job_id=job.id)
        assert job.worker == "b" and job.attempts == 2 and job.status == JobStatus.RUNNING


def test_cancel_retry_and_finish(engine):
    with Session(engine) as s:
        job = new_job(s)
        job = crud.request_cancel(session=s, job_id=job.id)
        assert job.status == JobStatus.CANCELLED and job.finished_at is not None
        assert not crud.claim_job(session=s, job_id=job.id, worker="a", stale_after=dt.timedelta(seconds=1))
        job = crud.retry_job(session=s, job_id=job.id)
        assert job.status == JobStatus.QUEUED and not job.cancel_requested
        with pytest.raises(ValueError, match="only FAILED or CANCELLED"):
            crud.retry_job(session=s, job_id=job.id)
        with pytest.raises(LookupError):
            crud.request_cancel(session=s, job_id=999)
        crud.finish_job(session=s, job_id=job.id, status=JobStatus.FAILED, error="boom", result={"x": 1})
        s.expire_all()
        job = crud.get_job(session=s, job_id=job.id)
        assert (job.status, job.error, job.result) == (JobStatus.FAILED, "boom", {"x": 1})


def test_step_metrics_are_unique_per_step_and_trimmed_on_resume(engine):
    step = dict(loss=1.0, terms={"ce": 1.0, "kl": 0.5, "cosine": 0.1}, lr=1e-4, grad_norm=1.0, tokens=32,
                tokens_per_s=10.0)
    with Session(engine) as s:
        job = new_job(s)
        crud.record_steps(session=s, job_id=job.id, steps=[{**step, "step": i} for i in (1, 2, 3)])
        crud.forget_steps_after(session=s, job_id=job.id, step=1)
        crud.record_steps(session=s, job_id=job.id, steps=[{**step, "step": i} for i in (2, 3)])
        assert [m.step for m in crud.steps_of(session=s, job_id=job.id)] == [1, 2, 3]
        with pytest.raises(IntegrityError):
            crud.record_steps(session=s, job_id=job.id, steps=[{**step, "step": 3}])
        s.rollback()
        with pytest.raises(IntegrityError):  # foreign keys are enforced (SQLite too)
            s.add(StepMetric(job_id=12345, step=1, **step))
            s.commit()


def test_students_sizes_and_results_are_idempotent(engine):
    sizes = [{"n_layers": n, "params": 10 * n, "params_no_embed": 8 * n, "patched": [], "layers": ["S0"]} for n in (2, 3)]
    rows = [{"key": "student-2", "series": "student", "n_layers": 2, "params": 20, "task": "quiz", "metric": "acc",
             "value": 0.5, "stderr": None, "cell": "quiz.abc.json", "settings": {"limit": 3}},
            {"key": "student-2", "series": "student", "n_layers": 2, "params": 20, "task": "cost", "metric": "peak_mb",
             "value": float("nan"), "stderr": None, "cell": "cost.def.json"}]
    with Session(engine) as s:
        t = crud.get_or_create_teacher(session=s, source="default", fingerprint="f", n_layers=3)
        assert crud.get_or_create_teacher(session=s, source="default").id == t.id
        st = crud.upsert_student(session=s, folder="/x/student", manifest={"a": 1}, sizes=sizes, teacher_id=t.id)
        st2 = crud.upsert_student(session=s, folder="/x/student", manifest={"a": 2}, sizes=sizes[:1], teacher_id=t.id)
        assert st.id == st2.id and [z.n_layers for z in crud.sizes_of(session=s, student_id=st.id)] == [2]
        assert crud.record_eval_rows(session=s, student_id=st.id, job_id=None, rows=rows) == 1  # NaN is not stored
        assert crud.record_eval_rows(session=s, student_id=st.id, job_id=None, rows=rows) == 0
        (r,) = crud.eval_results(session=s, student_id=st.id)
        assert (r.value, r.stderr, r.settings) == (0.5, None, {"limit": 3})


def test_sqlite_is_in_wal_mode(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_database_url_forms(monkeypatch, tmp_path):
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path))
    assert database_url() == f"sqlite:///{tmp_path / 'boomerang.db'}"


def test_processes_starting_together_on_a_fresh_sqlite_file_all_migrate(tmp_path):
    # the quick start starts a worker and asks for the job list at once: both migrate a new file
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from db.engine import make_engine, current_revision; print(current_revision(make_engine({url!r})))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
