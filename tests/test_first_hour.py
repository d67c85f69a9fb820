"""A new user's first hour: evaluation that works offline with its defaults, numbers with their noise,
and a distillation that asks for its own evaluation."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import uuid

import pytest
import redis
import torch
from sqlmodel import Session

from boomerang import data as d
from boomerang.cli import main
from boomerang.errors import BoomerangError
from boomerang.evaluation import task_files
from boomerang.evaluation.chart import figure, noise_note, points
from boomerang.evaluation.metrics import label_free, metrics_of
from boomerang.evaluation.run import EvalRequest
from boomerang.family import Family
from boomerang.plan import LayerPlan
from boomerang.student import cut_student
from boomerang.training.recipe import recipe_changes
from db import crud
from db.engine import make_engine
from db.models import JobCreate, JobStatus
from tiny import N_LAYERS, save_tiny_teacher, tiny_model, tiny_tokenizer, tokens

TEXT = "The first hour of a new user, written out long enough for training and held-out blocks. " * 80
SHIPPED = {"arc_easy_mini": 200, "hellaswag_mini": 50, "piqa_mini": 200}


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path / "home"))
    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tmp_path


# ----------------------------------------------------------------------------- noise


def test_a_mean_of_hits_gets_its_binomial_stderr_and_other_metrics_keep_theirs():
    result = {"results": {"acc,none": 0.6, "acc_stderr,none": "N/A", "acc_norm,none": 0.5, "acc_norm_stderr,none": 0.07,
                          "perplexity,none": 3.0, "perplexity_stderr,none": "N/A", "alias": "quiz"},
              "n-samples": {"original": 80, "effective": 50}}
    got = metrics_of(result)
    assert got["acc"] == (0.6, pytest.approx(math.sqrt(0.6 * 0.4 / 49)))  # the effective count, not the original
    assert got["acc_norm"] == (0.5, 0.07)  # lm-eval's own stderr wins when it has one
    assert got["perplexity"] == (3.0, None)  # not a mean of 0/1 scores: no closed form, left missing
    assert metrics_of({**result, "n-samples": {}})["acc"][1] is None  # no item count: nothing made up


def test_label_free_stderr_is_the_spread_of_the_per_block_values():
    teacher = tiny_model("llama")
    plan = LayerPlan.from_rule(N_LAYERS)
    model = Family(teacher, cut_student(teacher, plan, share=True), plan).build(5)
    blocks = tokens(5, 12)
    r = label_free(model, teacher, blocks, batch_size=2)
    per_block = []
    with torch.no_grad():
        for b in blocks:
            lp = torch.log_softmax(model(b[None]).logits[0, :-1], -1)
            tp = torch.log_softmax(teacher(b[None]).logits[0, :-1], -1)
            per_block.append((tp.exp() * (tp - lp)).sum(-1).mean().item())
    mean = sum(per_block) / 5
    assert r.kl_to_teacher == pytest.approx(mean, rel=1e-5)
    assert r.kl_stderr == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in per_block) / 4 / 5), rel=1e-4)
    assert label_free(model, teacher, blocks[:1]).kl_stderr is None  # one block: no spread to measure


def test_charts_draw_error_bars_and_say_what_is_within_noise():
    rows = [{"key": f"m{i}", "series": "interpolated", "n_layers": i, "params": i * 10, "task": t, "metric": "acc",
             "value": v, "stderr": 0.03, "blocks": ""} for i, v in ((5, 0.4), (6, 0.45)) for t in ("a", "b")]
    fig = figure(points(rows, "a", "acc"), "a", "acc")
    assert list(fig.data[0].error_y.array) == [0.03, 0.03] and fig.data[0].error_y.visible
    avg = points(rows, "average", "acc")
    assert avg[0]["stderr"] == pytest.approx(math.sqrt(2 * 0.03 ** 2) / 2)  # two independent tasks
    assert "0.085" in noise_note(points(rows, "a", "acc"))  # 2 * sqrt(2) * 0.03
    assert noise_note([{**r, "stderr": None} for r in rows]) == ""


# ----------------------------------------------------------------------------- shipped tasks


def test_the_shipped_tasks_are_valid_documented_and_resolve_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert task_files.shipped_tasks() == sorted(SHIPPED)
    readme = (task_files.SHIPPED_DIR / "README.md").read_text()
    for name, count in SHIPPED.items():
        path = task_files.SHIPPED_DIR / f"{name}.jsonl"
        assert task_files.check_files(name, [path]) == "multiple_choice"
        items = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(items) == count and all(0 <= it["gold"] < len(it["choices"]) for it in items)
        assert f"`{name}`" in readme and hashlib.sha256(path.read_bytes()).hexdigest() in readme
    specs = task_files.resolve(sorted(SHIPPED), None)  # no data folder needed
    assert [s["task"] for s in specs] == sorted(SHIPPED)
    with pytest.raises(BoomerangError, match="no task 'arc_easy' in the shipped tasks .*found: arc_easy_mini"):
        task_files.resolve(["arc_easy"], None)


def test_the_standard_request_takes_the_runs_heldout_text_when_there_is_one_and_always_the_general_text(place):
    main(["cut", "--teacher", str(place / "teacher"), "--out", str(place / "student")])
    bare = EvalRequest.standard(str(place / "student"))
    assert (bare.tasks, bare.cost, bare.heldout_data, bare.general_data, bare.baselines) == (
        sorted(SHIPPED), True, None, d.SHIPPED_GENERAL, ["undistilled", "drop-bi"])
    d.save_heldout(tokens(3, 16), place / "student")
    full = EvalRequest.standard(str(place / "student"), sizes="5,8")
    assert full.heldout_data == str(place / "student" / d.HELDOUT_FILE)
    assert full.baselines == ["undistilled", "drop-bi"] and full.sizes == "5,8"
    assert EvalRequest.from_dict(full.to_dict()) == full  # what a job row stores


def test_held_out_tokens_that_are_not_this_teachers_are_refused(tmp_path):
    tok = tiny_tokenizer()
    torch.save(torch.full((2, 8), 10_000), tmp_path / "foreign.pt")
    torch.save(torch.rand(2, 8), tmp_path / "floats.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a tensor file")
    for name, message in (("foreign", "beyond this teacher's vocabulary"), ("floats", "no .blocks, tokens. integer"),
                          ("broken", "cannot read held-out tokens")):
        with pytest.raises(BoomerangError, match=message):
            d.heldout_blocks(str(tmp_path / f"{name}.pt"), tok, 64)


# ----------------------------------------------------------------------------- a distillation that evaluates itself


def test_distill_with_evaluate_keeps_its_heldout_split_and_ends_with_the_standard_evaluation(place, monkeypatch, capsys):
    from boomerang.evaluation import run as eval_run

    monkeypatch.setattr(eval_run, "STANDARD_LIMIT", 3)  # the real 100 items per task, cut for a unit test's time
    # the tiny teacher reads characters and its context is 128: the shipped tasks' shortest items, under their names
    short = place / "shipped"
    short.mkdir()
    for name in SHIPPED:
        lines = (task_files.SHIPPED_DIR / f"{name}.jsonl").read_text().splitlines()
        fits = [line for line in lines if len(json.loads(line)["query"]) + max(map(len, json.loads(line)["choices"])) < 110]
        (short / f"{name}.jsonl").write_text("\n".join(fits[:3]) + "\n")
    monkeypatch.setattr(task_files, "SHIPPED_DIR", short)
    run = place / "run"
    argv = ["distill", "--teacher", str(place / "teacher"), "--data", str(place / "corpus.txt"), "--seq-len", "16",
            "--batch-size", "2", "--device", "cpu", "--steps", "2", "--out", str(run), "--evaluate"]
    assert main(argv) == 0
    assert "evaluating the family" in capsys.readouterr().out
    student = run / "student"
    # the held-out blocks kept are exactly the run's held-out split (never trained on)
    stream = d.pack(d.read_documents(str(place / "corpus.txt")), tiny_tokenizer(), 16)
    assert torch.equal(torch.load(student / d.HELDOUT_FILE, weights_only=True).long(),
                       d.split_blocks(stream, 16, 0.1, "corpus")[1][: d.HELDOUT_MAX_BLOCKS])
    with open(student / "eval" / "family.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {*SHIPPED, "heldout", "general", "cost"}
    assert {r["series"] for r in rows} == {"student", "interpolated", "teacher", "undistilled", "drop-bi"}
    accs = [r for r in rows if r["task"] == "arc_easy_mini" and r["metric"] == "acc"]
    sizes = {r["n_layers"] for r in accs if r["series"] in ("student", "interpolated", "teacher")}
    assert len(sizes) >= 3  # every size of the family, and each baseline at every size below the teacher:
    assert len(accs) == len(sizes) + 2 * (len(sizes) - 1) and all(r["stderr"] != "" for r in accs)
    kls = [r for r in rows if r["metric"] == "kl_to_teacher" and r["series"] != "teacher"]
    assert kls and all(r["stderr"] != "" for r in kls)
    # asking for the evaluation is not a setting of the training: the run resumes with or without it
    assert recipe_changes({"steps": 2, "evaluate": True}, {"steps": 2, "evaluate": False}) == []


def test_a_workers_distillation_with_evaluate_queues_the_standard_evaluation(place, monkeypatch):
    from workers.runner import run_job
    from workers.submit import validate

    url = os.environ.get("BOOMERANG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"this test needs a real Redis at {url} (.ci/run starts one): {exc}")
    monkeypatch.setenv("REDIS_URL", url)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    engine = make_engine(f"sqlite:///{place / 'jobs.db'}")
    clean = validate("distill", dict(teacher=str(place / "teacher"), data=str(place / "corpus.txt"), steps=2,
                                     batch_size=2, seq_len=16, evaluate=True))
    with Session(engine) as s:
        job_id = crud.create_job(session=s, job_in=JobCreate(kind="distill", settings=clean, queue=queue)).id
    try:
        assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
        with Session(engine) as s:
            job = crud.get_job(session=s, job_id=job_id)
            follow = crud.get_job(session=s, job_id=job.result["evaluation_job"])
        assert (follow.kind, follow.status, follow.queue) == ("eval", JobStatus.QUEUED, queue)
        assert follow.settings["tasks"] == sorted(SHIPPED) and follow.settings["cost"] is True
        assert follow.settings["heldout_data"] == str(place / "home" / "runs" / f"job-{job_id}" / "student" / d.HELDOUT_FILE)
        assert follow.settings["baselines"] == ["undistilled", "drop-bi"]
        assert follow.settings["settings"]["limit"] == 100
        assert redis.Redis.from_url(url).llen(queue) == 1  # really on the queue, for the next free worker
    finally:
        redis.Redis.from_url(url).delete(queue)


# ----------------------------------------------------------------------------- how long a job will take


def test_a_run_records_its_rates_and_the_next_launch_is_estimated_from_them(place):
    from boomerang.models import load_teacher
    from boomerang.training import timing

    fingerprint = load_teacher(str(place / "teacher")).fingerprint
    assert timing.estimate(fingerprint, "cpu", steps=10, tokens_per_step=32, mixed=False) is None  # nothing measured
    argv = ["distill", "--teacher", str(place / "teacher"), "--data", "teacher", "--teacher-docs", "4", "--seq-len", "16",
            "--batch-size", "2", "--device", "cpu", "--steps", "3", "--recipe", "paper", "--out", str(place / "run")]
    assert main(argv) == 0
    entry = timing.read_all()[f"{fingerprint}|cpu|student"]
    assert entry["train_tokens_per_s"] > 0 and entry["corpus_tokens_per_s"] > 0
    est = timing.estimate(fingerprint, "cpu", steps=100, tokens_per_step=64, mixed=False, corpus_tokens=1000)
    assert est.parts["training"] == pytest.approx(100 * 64 / entry["train_tokens_per_s"])
    assert est.parts["writing the teacher's corpus"] == pytest.approx(1000 / entry["corpus_tokens_per_s"])
    assert est.seconds == pytest.approx(sum(est.parts.values()))
    # a mixed-size recipe falls back on the other kind's record of the same teacher, never another teacher's
    assert timing.estimate(fingerprint, "cpu", steps=1, tokens_per_step=1, mixed=True) is not None
    assert timing.estimate("0" * 32, "cpu", steps=1, tokens_per_step=1, mixed=False) is None


def test_dominated_points_are_named_with_what_beats_them():
    from boomerang.evaluation.chart import dominated_by

    pts = [{"key": k, "params": p, "value": v, "series": "interpolated", "n_layers": 1}
           for k, p, v in [("small", 1, 0.5), ("mid", 2, 0.45), ("big", 3, 0.7), ("twin", 3, 0.6)]]
    assert dominated_by(pts) == {"small": None, "mid": "small", "big": None, "twin": "big"}
    assert dominated_by(pts, higher_is_better=False) == {"small": None, "mid": None, "big": "small", "twin": "small"}
    fig = figure(pts, "t", "acc")
    assert list(fig.data[0].marker.symbol) == ["circle", "circle-open", "circle", "circle-open"]  # sorted by params
