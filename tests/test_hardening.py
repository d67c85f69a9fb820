"""Bad, hostile and unlucky input: every case is refused with one clear line and changes nothing else.

The CLI table runs each command in this process: an uncaught exception fails the test with its
traceback, so "no traceback" is checked by construction, as are the exit code, the message and the
files left behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from sqlmodel import Session
from test_eval import write_eval_files

from boomerang.cli import main
from boomerang.errors import BoomerangError
from db import crud
from db.engine import make_engine
from db.models import JobCreate, JobStatus
from tiny import save_tiny_teacher

TEXT = "Nothing here should survive a bad input: no rows, no files, no half-written folders. " * 60


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A tiny teacher, a corpus, a cut student, evaluation files (good and broken), a pickled-weights teacher."""
    tmp = tmp_path_factory.mktemp("bad")
    save_tiny_teacher(tmp / "teacher", "llama")
    (tmp / "corpus.txt").write_text(TEXT)
    assert main(["cut", "--teacher", str(tmp / "teacher"), "--out", str(tmp / "student")]) == 0
    good = write_eval_files(tmp / "evaldata")
    broken = tmp / "broken"
    broken.mkdir()
    quiz = (good / "quiz.jsonl").read_text().splitlines()
    (broken / "late.jsonl").write_text("\n".join([quiz[0], quiz[1], '{"query": "q", "choices": ["a"', quiz[2]]) + "\n")
    (broken / "keys.jsonl").write_text("\n".join([quiz[0], json.dumps({"query": "q", "gold": 0})]) + "\n")
    pickled = tmp / "pickled-teacher"
    pickled.mkdir()
    for f in (tmp / "teacher").iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save({"model.embed_tokens.weight": Payload(tmp / "pwned-by-weights")}, pickled / "pytorch_model.bin")
    (tmp / "short.txt").write_text("Too short for a block.")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "ten.json").write_text(json.dumps({"steps": "ten"}))
    (tmp / "null.json").write_text(json.dumps({"steps": None}))
    return tmp


def T(place):
    return ["--teacher", str(place / "teacher")]


def D(place):
    return ["--data", str(place / "corpus.txt"), "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


CASES = [
    # (id, argv builder, environment, words the message must hold)
    ("lr nan", lambda p: ["distill", *T(p), *D(p), "--lr", "nan", "--out", str(p / "r")], {}, "lr must be a finite number, got nan"),
    ("lr inf", lambda p: ["distill", *T(p), *D(p), "--lr", "inf", "--out", str(p / "r")], {}, "lr must be a finite number, got inf"),
    ("steps 1e15", lambda p: ["distill", *T(p), *D(p), "--steps", str(10**15), "--out", str(p / "r")], {},
     "steps must be at most 10,000,000"),
    ("seq-len over the context", lambda p: ["distill", *T(p), "--data", str(p / "corpus.txt"), "--seq-len", "1000000",
                                            "--out", str(p / "r")], {}, "longer than the teacher's context (128 tokens)"),
    ("64 processes on 2 cores", lambda p: ["distill", *T(p), *D(p), "--processes", "64", "--out", str(p / "r")], {},
     "processes=64 on the CPU, but this machine has"),
    ("heldout fraction 1.5", lambda p: ["distill", *T(p), *D(p), "--heldout-fraction", "1.5", "--out", str(p / "r")], {},
     "heldout_fraction must be in (0, 1), got 1.5"),
    ("recipe steps ten", lambda p: ["distill", *T(p), *D(p), "--recipe", str(p / "ten.json"), "--out", str(p / "r")], {},
     'ten.json: steps must be an integer, got "ten"'),
    ("recipe steps null", lambda p: ["distill", *T(p), *D(p), "--recipe", str(p / "null.json"), "--out", str(p / "r")], {},
     "null.json: steps must be an integer, got null"),
    ("recipe a list", lambda p: ["distill", *T(p), *D(p), "--recipe", str(p / "list.json"), "--out", str(p / "r")], {},
     "a recipe is a JSON object of settings, got list"),
    ("a run that fails after making its folder", lambda p: ["distill", *T(p), "--data", str(p / "short.txt"),
                                                             "--seq-len", "100", "--device", "cpu", "--out", str(p / "r")],
     {}, "not one training block of 100"),
    ("resume a missing folder", lambda p: ["distill", "--resume", "--out", str(p / "nowhere")], {},
     "no run in"),
    ("run folder not writable", lambda p: ["distill", *T(p), *D(p), "--steps", "1", "--out", "/proc/boomerang-run"], {},
     "cannot create the run folder /proc/boomerang-run"),
    ("generate max-new-tokens -5", lambda p: ["generate", *T(p), "--prompt", "hi", "--max-new-tokens", "-5"], {},
     "max_new_tokens must be between 1 and 32,768, got -5"),
    ("generate temperature -1", lambda p: ["generate", *T(p), "--prompt", "hi", "--temperature", "-1"], {},
     "temperature must be between 0 (greedy) and 100, got -1"),
    ("generate empty prompt", lambda p: ["generate", *T(p), "--prompt", "  "], {}, "the prompt is empty"),
    ("export into /proc", lambda p: ["export", "--student", str(p / "student"), "--layers", "6", "--out", "/proc/x"], {},
     "cannot write in /proc"),
    ("export a size the family lacks", lambda p: ["export", "--student", str(p / "student"), "--layers", "99",
                                                  "--out", str(p / "e")], {}, "no size with 99 layers in this family"),
    ("gguf export of an unknown type", lambda p: ["export", "--student", str(p / "student"), "--layers", "6",
                                                  "--format", "gguf", "--type", "q3", "--out", str(p / "e.gguf")], {},
     "unknown GGUF type 'q3'"),
    ("gguf export to a name without .gguf", lambda p: ["export", "--student", str(p / "student"), "--layers", "6",
                                                       "--format", "gguf", "--out", str(p / "e")], {},
     "does not end in .gguf"),
    ("gguf export into /proc", lambda p: ["export", "--student", str(p / "student"), "--layers", "6", "--format", "gguf",
                                          "--out", "/proc/x.gguf"], {}, "cannot write in /proc"),
    ("gguf export a size the family lacks", lambda p: ["export", "--student", str(p / "student"), "--layers", "99",
                                                       "--format", "gguf", "--out", str(p / "e.gguf")], {},
     "no size with 99 layers in this family"),
    ("gguf export of a character tokenizer", lambda p: ["export", "--student", str(p / "student"), "--layers", "6",
                                                        "--format", "gguf", "--out", str(p / "e.gguf")], {},
     "tokenizer (WordLevel) is not a byte-level BPE"),
    ("export in an unknown format", lambda p: ["export", "--student", str(p / "student"), "--layers", "6",
                                               "--format", "onnx", "--out", str(p / "e")], {},
     "unknown export format 'onnx': choose hf or gguf"),
    ("teacher with pickled code for weights", lambda p: ["teacher", "--teacher", str(p / "pickled-teacher")], {},
     "cannot load the model in"),
    ("heldout tokens 0", lambda p: ["heldout", *T(p), "--data", str(p / "corpus.txt"), "--tokens", "0"], {},
     "--tokens must be at least 2"),
    ("heldout fraction 1.5", lambda p: ["heldout", *T(p), "--data", str(p / "corpus.txt"), "--heldout-fraction", "1.5"],
     {}, "--heldout-fraction must be in (0, 1), got 1.5"),
    ("task file broken on a later line", lambda p: ["eval", str(p / "student"), "--tasks", "late", "--data-dir",
                                                    str(p / "broken"), "--out", str(p / "ev")], {},
     "late.jsonl, line 3: not valid JSON"),
    ("task file missing keys", lambda p: ["eval", str(p / "student"), "--tasks", "keys", "--data-dir", str(p / "broken"),
                                          "--out", str(p / "ev")], {}, "keys.jsonl, line 2: missing choices"),
    ("mysql database", lambda p: ["jobs"], {"DATABASE_URL": "mysql://u:p@127.0.0.1/db"},
     "DATABASE_URL scheme 'mysql' is not supported"),
    ("postgres down", lambda p: ["jobs"], {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"},
     "cannot reach the database at postgresql+psycopg://nobody@127.0.0.1:9/none"),
    ("auth without a colon", lambda p: ["app", "--auth", "nocolon", "--port", "1"], {},
     "--auth must hold USER:PASSWORD"),
    ("submit a size the family lacks", lambda p: ["submit", "export", "--student", str(p / "student"), "--layers", "99",
                                                  "--out", str(p / "e")], {}, "no size with 99 layers in this family"),
    ("eval a general text that is not there", lambda p: ["eval", str(p / "student"), "--general-data",
                                                         str(p / "nowhere.txt"), "--out", str(p / "ev")], {},
     "general text not found"),
    ("eval with unknown ends", lambda p: ["eval", str(p / "student"), "--cost", "--ends", "middle", "--out", str(p / "ev")],
     {}, "ends must be one of student, teacher, auto, got 'middle'"),
    ("snapshot of a folder that is no run", lambda p: ["snapshot", str(p / "student")], {},
     "is not a distillation's run folder"),
    ("baselines of an undistilled student", lambda p: ["baselines", str(p / "student")], {},
     "was not distilled by this tool"),
    ("compare a family never evaluated", lambda p: ["compare", str(p / "student"), "--out", str(p / "cmp")], {},
     "no evaluation results in"),
    ("compare a table that is not there", lambda p: ["compare", str(p / "nowhere.csv:a,b"), "--out", str(p / "cmp")],
     {}, "no such table:"),
    ("eval an unknown task offline", lambda p: ["eval", str(p / "student"), "--tasks", "arc_easy", "--out", str(p / "ev")],
     {"HF_DATASETS_OFFLINE": "1"}, "no task 'arc_easy' in the shipped tasks"),
]


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name, argv, env, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_exit_2_and_leaves_nothing(place, tmp_path, monkeypatch, capsys, name, argv, env,
                                                                  words):
    db = tmp_path / "db"
    db.mkdir()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db / 'jobs.db'}")
    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # nothing may reach a queue
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(place)
    code = main(argv(place))
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.strip().startswith(("warning:", "distill:"))]  # warnings, progress bar aside
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err and len(lines[0]) < 600
    assert snapshot(place) == before, "a bad input left files behind"
    assert not (place / "pwned-by-weights").exists(), "a pickled teacher ran code"
    if (db / "jobs.db").exists():
        with Session(make_engine(f"sqlite:///{db / 'jobs.db'}")) as s:
            assert crud.list_jobs(session=s) == []


# ----------------------------------------------------------------------------- hostile files


class Payload:
    """Pickled, it runs code when unpickled: it would create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(place, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", *T(place), *D(place), "--steps", "2", "--checkpoint-every", "1", "--out", str(run)]) == 0
    marker = tmp_path / "pwned"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["rng"]["python"] = Payload(marker)
    torch.save(state, run / "checkpoint.pt")  # what torch.save writes is a pickle: it can carry code
    capsys.readouterr()
    assert main(["distill", "--resume", "--out", str(run), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint this library wrote" in err and "Traceback" not in err
    assert not marker.exists(), "the checkpoint's code ran"
    torch.load(run / "checkpoint.pt", weights_only=False)  # loaded the unsafe way, the same file does run code
    assert marker.exists(), "the payload is not live: this test could not fail"


# ----------------------------------------------------------------------------- crashes and bad luck in training


def config(place, out: Path, **kw):
    from boomerang.training.recipe import DistillConfig

    base = dict(teacher=str(place / "teacher"), data=str(place / "corpus.txt"), out=str(out), steps=4, batch_size=2,
                seq_len=16, lr=1e-3, warmup=0.25, checkpoint_every=100, device="cpu")
    return DistillConfig(**{**base, **kw})


def test_a_run_that_died_before_its_first_checkpoint_starts_again_on_resume(place, tmp_path):
    from boomerang.training.loop import distill

    full = distill(config(place, tmp_path / "full"))

    def crash(report):
        if report.step == 2:
            raise KeyboardInterrupt  # a kill: no checkpoint was ever written

    with pytest.raises(KeyboardInterrupt):
        distill(config(place, tmp_path / "crashed"), on_step=crash)
    assert not (tmp_path / "crashed" / "checkpoint.pt").exists() and (tmp_path / "crashed" / "recipe.json").exists()
    with pytest.raises(BoomerangError, match="already holds a run: pass --resume"):
        distill(config(place, tmp_path / "crashed"))
    again = distill(config(place, tmp_path / "crashed"), resume=True)
    assert again.steps_done == 4 and again.student_dir is not None
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    a = torch.load(full.out / "checkpoint.pt", weights_only=True)["student"]
    b = torch.load(again.out / "checkpoint.pt", weights_only=True)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted run is not the run it replaces"


def test_a_moved_run_folder_resumes_and_a_conflicting_recipe_is_refused(place, tmp_path, capsys):
    run = tmp_path / "here"
    stop = tmp_path / "stop"
    stop.touch()
    assert main(["distill", *T(place), *D(place), "--steps", "4", "--out", str(run), "--stop-file", str(stop)]) == 0
    moved = tmp_path / "there"
    run.rename(moved)
    capsys.readouterr()
    assert main(["distill", "--resume", "--out", str(moved), "--recipe", "paper"]) == 2
    assert "--recipe paper differs from the run's recipe in" in capsys.readouterr().err
    assert main(["distill", "--resume", "--out", str(moved)]) == 0
    steps = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (moved / "student" / "boomerang.json").is_file()


def test_a_loss_that_stops_being_finite_stops_the_run_keeping_the_last_checkpoint(place, tmp_path):
    from boomerang.training.loop import NonFiniteLoss, distill

    cfg = config(place, tmp_path / "nan", steps=20, lr=1e12, clip=0.0, warmup=0.0, checkpoint_every=1)
    reports = []
    with pytest.raises(NonFiniteLoss, match=r"the loss became (nan|inf) .* at step \d+: training stopped") as err:
        distill(cfg, on_step=reports.append)
    bad_step = int(str(err.value).split(" at step ")[1].split(":")[0])
    assert reports and len(reports) == bad_step - 1, "a step after the bad one was reported"
    assert all(torch.isfinite(torch.tensor([r.loss, *r.terms.values()])).all() for r in reports)
    kept = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert kept["step"] == bad_step - 1 and all(torch.isfinite(v).all() for v in kept["student"].values())
    assert not (tmp_path / "nan" / "student").exists(), "a NaN student was written"


def test_a_queued_job_whose_loss_is_not_finite_fails_saying_so(place, tmp_path, monkeypatch):
    from workers.runner import run_job
    from workers.submit import validate

    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path / "home"))
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    settings = validate("distill", config(place, tmp_path / "job-run", steps=20, lr=1e12, clip=0.0, warmup=0.0).to_dict())
    with Session(engine) as s:
        job = crud.create_job(session=s, job_in=JobCreate(kind="distill", settings=settings))
    assert run_job(job.id, engine=engine, worker="test") == "FAILED"
    with Session(engine) as s:
        done = crud.get_job(session=s, job_id=job.id)
        rows = crud.steps_of(session=s, job_id=job.id)
    assert done.error.startswith("the loss became") and "Traceback" not in done.error
    assert rows and all(r.loss == r.loss for r in rows)  # every stored step is a number


def test_retry_while_redis_is_down_changes_nothing(tmp_path):
    from workers.app import make_celery
    from workers.submit import requeue

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    with Session(engine) as s:
        job_id = crud.create_job(session=s, job_in=JobCreate(kind="distill", settings={"steps": 1})).id
        crud.finish_job(session=s, job_id=job_id, status=JobStatus.FAILED, error="it broke")
    with pytest.raises(BoomerangError, match="could not queue the job"):
        requeue(engine=engine, app=make_celery("redis://127.0.0.1:9/0"), job_id=job_id)
    with Session(engine) as s:
        after = crud.get_job(session=s, job_id=job_id)
    assert after.status == JobStatus.FAILED and after.error == "it broke"


def test_a_job_a_body_starts_while_redis_is_down_leaves_no_row_and_says_what_happens_instead(place, tmp_path):
    """`JobContext.queue_job` (a follow-up, an evaluation's part): with Redis down, no job row is left behind, the
    body goes on, and the job's log says what happens instead (by default: how to start it by hand)."""
    from workers.app import make_celery
    from workers.context import Heartbeat, JobContext

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    with Session(engine) as s:
        job = crud.create_job(session=s, job_in=JobCreate(kind="eval", settings={}, queue="q"))
    ctx = JobContext(engine, job, Heartbeat(engine, job.id, "test"), make_celery("redis://127.0.0.1:9/0"))
    settings = config(place, tmp_path / "run", steps=1).to_dict()
    assert ctx.queue_job("distill", settings, "the run") is None
    assert ctx.queue_job("distill", settings, "part 2/2", instead="it is computed here") is None
    with Session(engine) as s:
        assert [j.id for j in crud.list_jobs(session=s)] == [job.id], "a job that never reached the queue has no row"
    first, second = ctx._log
    assert first.startswith("the run was not queued (could not queue the job") and first.endswith(
        "start it from the Jobs tab or with boomerang submit distill"), first
    assert second.startswith("part 2/2 was not queued (") and second.endswith("; it is computed here"), second


def test_a_full_disk_while_checkpointing_frees_the_partial_file(place, tmp_path, monkeypatch):
    import errno

    from boomerang.training.checkpoint import save_checkpoint
    from boomerang.training.loop import distill, setup

    out = tmp_path / "disk"
    distill(config(place, out, steps=2, checkpoint_every=1))
    run = setup(config(place, out, steps=2, checkpoint_every=1), resume=True)

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BoomerangError, match=r"could not write the checkpoint of step 3 \(no space left on the device\); "
                                             r"freed the partial file, the checkpoint of an earlier step stays"):
        save_checkpoint(run, 3)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "heldout-tokens.pt", "metrics.jsonl", "plan.json",
                                                     "recipe.json", "student"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- the dashboard's login


def test_credentials_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from app.auth import credentials

    monkeypatch.delenv("BOOMERANG_AUTH", raising=False)
    (tmp_path / "auth").write_text("ada:s3cret:with:colons\n")
    assert credentials(auth=None, auth_file=str(tmp_path / "auth")) == ("ada", "s3cret:with:colons")
    monkeypatch.setenv("BOOMERANG_AUTH", "bob:pw")
    assert credentials(auth=None, auth_file=None) == ("bob", "pw")
    for bad in ("nocolon", ":pw", "user:", ""):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(BoomerangError, match="must hold USER:PASSWORD"):
            credentials(auth=None, auth_file=str(tmp_path / "bad"))
    with pytest.raises(BoomerangError, match="cannot read --auth-file"):
        credentials(auth=None, auth_file=str(tmp_path / "missing"))


def test_wrong_logins_are_slowed_down_per_client():
    import gradio as gr
    import httpx
    from starlette.middleware import Middleware

    from app.auth import FREE_TRIES, LoginThrottle

    with gr.Blocks() as demo:
        gr.Markdown("hello")
    middleware = [Middleware(LoginThrottle, lockout_s=0.5)]
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, auth=("ada", "right"),
                            app_kwargs={"middleware": middleware})
    try:
        def login(password):
            return httpx.post(url.rstrip("/") + "/login", data={"username": "ada", "password": password}, timeout=10)

        codes = [login("wrong").status_code for _ in range(FREE_TRIES + 3)]
        assert codes[:FREE_TRIES] == [400] * FREE_TRIES and set(codes[FREE_TRIES:]) == {429}, codes
        assert login("right").status_code == 429, "the right password must wait out the lock-out too"
        time.sleep(0.8)  # the lock-out (0.5 s here; it doubles with each further wrong login) is over
        assert login("right").status_code == 200
        assert login("wrong").status_code == 400, "a right login clears the count"
    finally:
        demo.close()
