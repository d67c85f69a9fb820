"""Dashboard handlers without a browser, and the launched app through gradio_client."""

from __future__ import annotations

import csv
import json
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlmodel import Session, select
from test_eval import write_eval_files
from test_jobs import REDIS_URL

from app import chat, common, compare, jobs, launch
from app.common import reported
from app.services import ModelCache, Services
from boomerang.errors import BoomerangError
from db import crud
from db.engine import make_engine
from tiny import save_tiny_teacher
from workers.app import make_celery
from workers.runner import run_job

# the handlers as the page wires them: a user's error comes back as the page's one-line message
launched = reported(launch.launch_job, "Not launched")
previewed = reported(launch.preview_plan, launch.PLAN_REFUSED, ([],))
evaluated = reported(jobs.evaluate_job, "Not queued")

TEXT = "A small corpus for a tiny teacher, repeated so there are enough blocks. " * 200


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A database with one finished tiny distillation and its evaluation, made by the real runner."""
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"these tests need Redis at {REDIS_URL}: {exc}")
    tmp = tmp_path_factory.mktemp("app")
    save_tiny_teacher(tmp / "teacher", "llama")
    (tmp / "corpus.txt").write_text(TEXT)
    data = write_eval_files(tmp / "evaldata")
    mp = pytest.MonkeyPatch()
    mp.setenv("BOOMERANG_HOME", str(tmp / "home"))
    engine = make_engine(f"sqlite:///{tmp / 'app.db'}")
    queue = f"app-{uuid.uuid4().hex[:6]}"
    services = Services(engine=engine, celery=make_celery(REDIS_URL), models=ModelCache(), eval_data_dir=str(data),
                        eval_tasks="quiz,fill", exports_dir=tmp / "exports", allowed_roots=(tmp,))
    services.queue = queue
    msg = launched(services, form(tmp))
    job_id = int(msg.split("Job ")[1].split(" ")[0])
    assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
    msg = evaluated(services, job_id, "quiz,fill", str(data), 5)
    eval_id = int(msg.split("job ")[1].split(" ")[0])
    assert run_job(eval_id, engine=engine, worker="test") == "SUCCEEDED"
    yield {"services": services, "tmp": tmp, "job": job_id, "eval": eval_id}
    mp.undo()


def form(tmp, **changes) -> dict:
    """The launch form as the page sends it: the paper recipe's values, a tiny teacher and corpus, a short run."""
    values = {**launch.form_values("paper"), "teacher": str(tmp / "teacher"), "data": str(tmp / "corpus.txt"), "steps": 8,
              "batch_size": 2, "seq_len": 16, "lr": 1e-3, "recipe": "paper", "evaluate": False}
    return {**values, **changes}


def test_the_launch_form_says_how_long_a_job_takes_from_this_machines_rates(world, monkeypatch, tmp_path):
    s, tmp = world["services"], world["tmp"]
    text = launch.launch_estimate(s, str(tmp / "teacher"), str(tmp / "corpus.txt"), 80, 2, 16, 0, "rule")
    assert text.startswith("**About ") and " on cpu**" in text and "training" in text  # the world's run measured it
    slower = launch.launch_estimate(s, str(tmp / "teacher"), str(tmp / "corpus.txt"), 800, 2, 16, 0, "rule")
    assert slower != text  # ten times the steps: another number
    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path / "fresh"))  # a machine where nothing ran
    assert "no run of this teacher has been timed" in launch.launch_estimate(s, str(tmp / "teacher"), "", 80, 2, 16, 0)
    assert launch.launch_estimate(s, "./no/such/teacher", "", 80, 2, 16, 0) == ""  # the launch says what is wrong


def test_the_launch_form_says_how_much_memory_a_job_needs_and_whether_it_fits(world):
    s, tmp = world["services"], world["tmp"]
    teacher = str(tmp / "teacher")
    text = launch.memory_line(s, teacher, 1, 2, 2, "", 2, 16, 1, False, 0)
    assert text.startswith("**Memory:** about ") and "logits" in text and "fits this machine's" in text
    huge = launch.memory_line(s, teacher, 1, 2, 2, "", 65536, 100_000, 1, False, 0)
    assert "**does not fit**" in huge and "--grad-accum" in huge
    assert launch.memory_line(s, "./no/such/teacher", 1, 2, 2, "", 2, 16, 1, False, 0) == ""
    assert launch.memory_line(s, teacher, 1, 2, 2, "", 0, 16, 1, False, 0) == ""  # batch 0: the launch says why


def test_preview_shows_the_plan_and_every_size(world):
    s, tmp = world["services"], world["tmp"]
    text, rows = previewed(s, str(tmp / "teacher"), 1, 2, 2, "")
    assert "`[0, 2, 4, 6, 7]`" in text and "5 layers" in text and [r[0] for r in rows] == [5, 6, 7, 8]
    assert "**Patch order:** at each size, whichever of last-k, first-k and the greedy orders" in text
    text, rows = previewed(s, str(tmp / "teacher"), 1, 2, 2, "2,4")
    assert text.startswith("**Cannot use this plan:**") and "must keep layer 0" in text and rows == []
    text, rows = previewed(s, str(tmp / "teacher"), 1, 2, 2, "", "importance")  # what the cpu recipe uses
    assert "**Importance plan:** the job keeps 5 layers" in text and "known then" in text and len(rows) == 4
    text, rows = previewed(s, str(tmp / "teacher"), 1, 2, 2, "2,4")
    assert text.startswith("**Cannot use this plan:**") and "must keep layer 0" in text and rows == []


def test_the_recipe_choice_fills_the_form_and_goes_with_the_job(world):
    from boomerang.training.recipe import DistillConfig, named_recipe

    s, tmp = world["services"], world["tmp"]
    paper, cpu = launch.form_values("paper"), launch.form_values("cpu")
    assert paper["kl_weight"] == 0.1 and paper["plan"] == "rule" and paper["keep"] == ""
    reference = DistillConfig.from_dict(named_recipe("cpu"))
    for name in launch.LAUNCH_FIELDS:  # every field the recipe sets is on the form with the recipe's value
        if name not in ("keep", "evaluate"):
            assert cpu[name] == getattr(reference, name), name
    assert cpu["evaluate"] is True and paper["evaluate"] is True  # not a recipe's: a dashboard job is evaluated when done
    assert "Paper defaults" in launch.recipe_summary("paper") and "kl 0.1" in launch.recipe_summary("paper")
    summary = launch.recipe_summary("cpu")
    assert "CPU recipe" in summary and "kl 1" in summary and "ce" not in summary.split("loss terms")[1].split(";")[0]
    msg = launched(s, form(tmp, **{**cpu, "teacher": str(tmp / "teacher"), "data": str(tmp / "corpus.txt"),
                                       "recipe": "cpu"}))
    job_id = int(msg.split("Job ")[1].split(" ")[0])
    with Session(s.engine) as ses:
        job = crud.get_job(session=ses, job_id=job_id)
        crud.request_cancel(session=ses, job_id=job_id)
    for key, value in named_recipe("cpu").items():
        assert job.settings[key] == value, key


def test_launch_flags_bad_input_with_the_library_message(world):
    s, tmp = world["services"], world["tmp"]
    with Session(s.engine) as ses:
        before = len(crud.list_jobs(session=ses))
    msg = launched(s, form(tmp, data=str(tmp / "nope.txt")))
    assert msg.startswith("**Not launched:**") and "data not found" in msg
    msg = launched(s, form(tmp, teacher="./no/teacher", data="teacher"))
    assert "teacher folder not found" in msg
    msg = launched(s, form(tmp, data="teacher", local_weight=0.5, processes=0))
    assert msg.startswith("**Not launched:**") and "processes must be at least 1" in msg
    with Session(s.engine) as ses:
        assert len(crud.list_jobs(session=ses)) == before
    assert "default" in common.teacher_choices(s) and str(tmp / "teacher") in common.teacher_choices(s)


def test_jobs_table_and_detail(world):
    s = world["services"]
    rows = jobs.jobs_table(s)
    done = [r for r in rows if r[0] == world["job"]][0]
    assert done[1:4] == ["distill", "SUCCEEDED", "8/8"]
    status, curves, log = jobs.job_detail(s, world["job"])
    assert "data-status='SUCCEEDED'" in status and "student:" in status
    assert {c["term"] for c in curves} == {"ce", "kl", "cosine", "total"} and len(curves) == 4 * 8
    assert "step 8/8" in log
    fig = jobs.loss_figure(curves)
    assert [t.name for t in fig.data] == ["total", "ce", "kl", "cosine"] and list(fig.data[0].x) == list(range(1, 9))
    assert jobs.loss_figure([]) is None
    assert "No job 999" in jobs.job_detail(s, 999)[0]
    with pytest.raises(LookupError, match="999"):
        jobs.cancel_job(s, 999)
    assert "Cannot cancel" in reported(jobs.cancel_job, "Cannot cancel")(s, 999)
    with pytest.raises(ValueError, match="only FAILED or CANCELLED"):  # SUCCEEDED jobs are not retried
        jobs.retry_job(s, world["job"])


def test_compare_chart_table_csv_and_budget(world):
    s = world["services"]
    (label, sid), = common.family_choices(s)
    tasks, metrics = compare.task_metric_choices(s, sid)
    # Evaluate runs the standard evaluation with the form's tasks: the run's held-out text, the shipped general
    # text, cost, both baselines
    assert tasks == ["average", "cost", "fill", "general", "heldout", "quiz"] and "acc" in metrics
    fig, table, csv_path, msg, _ = compare.compare(s, sid, "quiz", "acc", True, "parameters", None)
    names = {t.name for t in fig.data}
    assert {"student", "interpolated", "teacher", "undistilled", "drop-bi", "Pareto frontier"} <= names
    assert sum(len(t.x) for t in fig.data if t.name in ("student", "interpolated", "teacher")) == 4
    assert sum(len(t.x) for t in fig.data if t.name in ("undistilled", "drop-bi")) == 3 + 3
    assert all(t.error_y.visible for t in fig.data if t.name in ("student", "interpolated", "undistilled"))
    from boomerang.evaluation.chart import noise_note, points

    assert noise_note(points(compare.result_rows(s, sid), "quiz", "acc")) in msg  # the error bars, explained
    assert fig.layout.xaxis.type == "log"
    lm_rows = [r for r in table if r[4] in ("quiz", "fill")]
    assert len(lm_rows) == 10 * 3 and all(r[7] != "" for r in lm_rows)  # 10 models x (quiz acc, acc_norm, fill acc)
    assert {r[5] for r in table if r[4] == "heldout"} == {"perplexity", "kl_to_teacher", "top1_agreement"}
    assert {r[5] for r in table if r[4] == "general"} == {"perplexity", "kl_to_teacher", "top1_agreement"}
    assert {r[5] for r in table if r[4] == "cost"} == {"weights_mb", "prefill_ms", "decode_tokens_per_s"}
    assert open(csv_path).read().startswith("model,series,layers,params,task,metric,value,stderr")
    assert "Measured with lm-eval" in msg and "on cpu, in float32" in msg  # how the numbers were made
    made = next(r for r in csv.DictReader(open(csv_path)) if r["task"] == "quiz")
    assert made["device"] == "cpu" and made["items"] == "5" and made["task_hash"]
    rows = compare.result_rows(s, sid)
    smallest = min(r["params"] for r in rows)
    fig, _, _, msg, _ = compare.compare(s, sid, "quiz", "acc", False, "parameters", smallest)
    assert "Best within the budget:**" in msg and "(5 layers," in msg and any(t.name == "fits the budget" for t in fig.data)
    assert "Nothing fits" in compare.compare(s, sid, "quiz", "acc", False, "parameters", 10)[3]
    assert "Best within the budget:**" in compare.compare(s, sid, "quiz", "acc", False, "latency (ms)", 1e6)[3]


def test_two_models_item_by_item_in_the_compare_tab(world):
    """The two-model view: which items the family's middle size gets right that the teacher does not and the
    reverse, counted as a hand count over the cells on disk, with McNemar's test; every model's training tokens."""
    from db.models import EvalResult, Student

    s = world["services"]
    (_, sid), = common.family_choices(s)
    models, tasks, a, b = compare.item_choices(s, sid)
    assert b == "teacher-8" and a in ("interpolated-6", "interpolated-7") and tasks == ["fill", "quiz"]
    assert models[0] in ("student-5", "undistilled-5", "drop-bi-5") and models[-1] == "teacher-8"
    summary, table = compare.items_view(s, sid, a, b, "quiz", "acc")
    with Session(s.engine) as session:
        cells = Path(session.get(Student, int(sid)).folder) / "eval" / "cells"
    right = {k: [i["scores"]["acc"] >= 0.5 for i in json.loads(next((cells / k).glob("quiz.*.json")).read_text())["items"]]
             for k in (a, b)}
    only_a = sum(x and not y for x, y in zip(right[a], right[b], strict=True))
    only_b = sum(y and not x for x, y in zip(right[a], right[b], strict=True))
    assert f"only {a} {only_a}, only {b} {only_b}," in summary and "McNemar exact test" in summary
    assert len(table) == only_a + only_b and all(r[1] in (f"only {a}", f"only {b}") for r in table)
    assert compare.items_view(s, sid, a, a, "quiz", "acc")[0] == "Pick two different models."
    with pytest.raises(BoomerangError, match="nope-3 has no quiz acc result"):
        compare.items_view(s, sid, a, "nope-3", "quiz", "acc")
    # the panel a tick redraws keeps the user's picks where the family has them, else the defaults
    rows = compare.result_rows(s, sid)
    kept = compare.item_panel(s, sid, rows, models[0], b, "fill", "acc_norm")
    assert [u["value"] for u in kept[:4]] == [models[0], b, "fill", "acc_norm"] and "acc_norm" in kept[4]
    fresh = compare.item_panel(s, sid, rows, "gone-3", None, "vanished")
    assert [u["value"] for u in fresh[:4]] == [a, b, "fill", "acc"] and fresh[4].startswith("**fill acc,")
    tokens = {r["key"]: r["train_tokens"] for r in compare.result_rows(s, sid)}
    assert tokens["interpolated-6"] == tokens["student-5"] == 8 * 2 * 16  # the family's one run, shared
    assert tokens["undistilled-6"] == 0 and tokens["teacher-8"] == ""
    # the tab's tick reads the rows every 10 s: the training costs are read again only when the rows change
    read = []
    real = compare.budget.training_costs
    compare.budget.training_costs = lambda folder: read.append(folder) or real(folder)
    try:
        compare._training_costs.cache_clear()
        compare.result_rows(s, sid), compare.result_rows(s, sid)
        assert len(read) == 1
        with Session(s.engine) as session:  # a cell lands
            crud.record_eval_rows(session=session, student_id=int(sid), job_id=None, rows=[dict(rows[0], key="x-1")])
        assert "x-1" in {r["key"] for r in compare.result_rows(s, sid)} and len(read) == 2
        with Session(s.engine) as session:  # leave the world as it was for the tests after this one
            session.delete(session.exec(select(EvalResult).where(EvalResult.model_key == "x-1")).one())
            session.commit()
    finally:
        compare.budget.training_costs = real


def test_chat_streams_both_sides_and_stop_ends_both(world):
    s = world["services"]
    (_, sid), = common.family_choices(s)
    counts, middle = chat.size_choices(s, sid)
    assert counts == [5, 6, 7, 8] and middle == 7 and "layers" in chat.size_label(s, sid, 6)
    assert "1 block patched" in chat.size_label(s, sid, 6)
    snapshots = list(chat.chat_turn(s, sid, 6, "hello", [], [], "be brief", 0, 1.0, 12, "session-a"))
    left, right, lstats, rstats = snapshots[-1]
    assert left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant"
    assert "12 tokens" in lstats and "12 tokens" in rstats and "first token" in lstats
    gen = chat.chat_turn(s, sid, 6, "hello", [], [], "", 0, 1.0, 400, "session-b")
    next(gen)
    s.stop_event("session-b").set()  # what the Stop button does for its session
    *_, (left, right, lstats, rstats) = gen
    assert int(lstats.split(": ")[1].split(" tokens")[0]) < 400 and int(rstats.split(": ")[1].split(" tokens")[0]) < 400


def test_export_the_chosen_size(world):
    from transformers import AutoModelForCausalLM

    s = world["services"]
    (_, sid), = common.family_choices(s)
    msg, file = chat.export_chosen(s, sid, 7)
    folder = msg.split("`")[1]
    assert file is None and AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 7
    assert "Exported" in chat.export_chosen(s, sid, 7)[0]  # exporting again replaces the folder


def test_export_the_chosen_size_as_gguf_refuses_in_one_line_and_leaves_nothing(world):
    """The tiny teacher's character tokenizer has no GGUF form (the real teacher's export: tests/test_gguf.py)."""
    s = world["services"]
    (_, sid), = common.family_choices(s)
    before = sorted(Path(s.exports_dir).iterdir()) if Path(s.exports_dir).exists() else []
    with pytest.raises(BoomerangError, match="tokenizer \\(WordLevel\\) is not a byte-level BPE.*--format hf"):
        chat.export_chosen(s, sid, 7, "student", "q8_0")
    with pytest.raises(BoomerangError, match="unknown GGUF type 'q9'"):
        chat.export_chosen(s, sid, 7, "student", "q9")
    assert (sorted(Path(s.exports_dir).iterdir()) if Path(s.exports_dir).exists() else []) == before


def test_gradio_client_against_the_launched_app(world):
    from gradio_client import Client

    from app.ui import build_app

    demo = build_app(world["services"])
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        client = Client(url, verbose=False)
        text, table = client.predict(str(world["tmp"] / "teacher"), 1, 2, 2, "", "rule", api_name="/preview")
        assert "5 layers" in text and [r[0] for r in table["data"]] == [5, 6, 7, 8]
        msg = client.predict(999, api_name="/cancel")
        assert "Cannot cancel" in msg
    finally:
        demo.close()


def test_launch_makes_no_request_outside_this_machine(world, monkeypatch):
    """Analytics off, no hub calls: every connection the app opens while starting and serving a page is local."""
    import ipaddress
    import socket
    import urllib.request

    from app.ui import build_app

    seen = []
    real_connect = socket.socket.connect

    def watch(sock, address):
        seen.append(address)
        return real_connect(sock, address)

    real_lookup = socket.getaddrinfo
    names = []

    def lookup(host, *args, **kwargs):
        names.append(host)
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", watch)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(world["services"])
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
    finally:
        demo.close()
    outside = []
    for address in seen:
        host = address[0] if isinstance(address, tuple) else address
        try:
            if not ipaddress.ip_address(host).is_loopback:
                outside.append(address)
        except ValueError:  # a unix socket path or a host name: a name would mean a lookup went out
            if isinstance(address, tuple):
                outside.append(address)
    assert not outside, outside
    assert {str(n) for n in names} <= {"127.0.0.1", "localhost", "::1", "None"}, names


def test_paths_outside_the_allowed_folders_are_refused_alike_whether_they_exist_or_not(world):
    s, tmp = world["services"], world["tmp"]
    with Session(s.engine) as ses:
        before = len(crud.list_jobs(session=ses))
    answers = [launched(s, form(tmp, data=path)) for path in ("/etc/hostname", "/etc", "/no/such/file", "/")]
    answers += [launched(s, form(tmp, teacher=path)) for path in ("/usr", "/no/such/folder", "../../..")]
    for msg in answers:
        assert msg.startswith("**Not launched:**") and "must be inside a folder this dashboard may read" in msg, msg
        assert "not found" not in msg and "is a file" not in msg and "config.json" not in msg
    assert len({m.split(":**")[1].split(" must")[0] for m in answers[:4]}) == 1  # one wording for every data path
    preview, _ = previewed(s, "/usr", 1, 2, 2, "")
    assert "must be inside a folder" in preview
    assert "must be inside a folder" in evaluated(s, world["job"], "quiz", "/etc", 5)
    with Session(s.engine) as ses:
        assert len(crud.list_jobs(session=ses)) == before
    assert s.path_allowed(str(tmp / "teacher")) and not s.path_allowed(str(tmp / ".." / "elsewhere"))


def test_free_text_is_bounded_before_it_is_parsed(world):
    s, tmp = world["services"], world["tmp"]
    for keep in ("0-3000000", "0-100000000", "1," * 3000):
        start = time.perf_counter()
        text, rows = previewed(s, str(tmp / "teacher"), 1, 2, 2, keep)
        assert time.perf_counter() - start < 1.0 and rows == []
        assert text.startswith("**Cannot use this plan:**") and len(text) < 400, text
    msg = launched(s, form(tmp, data="x" * 200_000))
    assert msg.startswith("**Not launched:**") and "too long (200,000 characters" in msg and len(msg) < 300


def test_the_chat_can_be_driven_and_stopped_through_the_api(world):
    """Whatever the page offers, the API offers: a chat turn streams through gradio_client."""
    from gradio_client import Client

    from app.ui import build_app

    s = world["services"]
    (_, sid), = common.family_choices(s)
    demo = build_app(s)
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, show_error=False)
    try:
        client = Client(url, verbose=False)
        left, right, left_stats, right_stats = client.predict(sid, 6, "hello", [], [], "", 0, 1.0, 8, api_name="/chat")
        assert left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant"
        assert "6 layers" in left_stats and "teacher" in right_stats
        with pytest.raises(Exception, match="less than minimum"):  # the page's own bounds hold for the API
            client.predict(sid, 6, "hello", [], [], "", -1, 1.0, 8, api_name="/chat")
        with pytest.raises(Exception, match=r"^no size with 23 layers in this family: sizes are 5\.\.8"):
            client.predict(sid, 23, "hello", [], [], "", 0, 1.0, 8, api_name="/chat")  # our message, not a traceback
        text, _ = client.predict(str(world["tmp"] / "teacher"), 1, 2, 2, "0-100000000", "rule", api_name="/preview")
        assert "out of range" in text and len(text) < 400
    finally:
        demo.close()


def test_the_chat_tab_shows_how_to_call_the_size_from_code(world):
    from boomerang.servers import register_server

    s = world["services"]
    (_, sid), = common.family_choices(s)
    with Session(s.engine) as ses:
        folder = crud.list_students(session=ses)[0].folder
    assert "boomerang serve --student" in chat.serving_snippet(s, sid, 6)
    path = register_server({"url": "http://127.0.0.1:8123/v1", "family": "fam", "student": str(folder),
                            "sizes": {"5": "fam-5L", "6": "fam-6L"}, "auth": True})
    try:
        snippet = chat.serving_snippet(s, sid, 6)
        assert "http://127.0.0.1:8123/v1" in snippet and '"model": "fam-6L"' in snippet
        assert "Authorization: Bearer $BOOMERANG_API_KEY" in snippet and "from openai import OpenAI" in snippet
        assert "has no 7-layer size" in chat.serving_snippet(s, sid, 7)
    finally:
        path.unlink()


def test_bad_input_through_the_api_is_answered_fast_and_short_and_changes_nothing(world):
    """The dashboard's twin of the CLI's bad-input table, through gradio_client as any script would call it."""
    from gradio_client import Client

    from app.ui import build_app

    s, tmp = world["services"], world["tmp"]
    with Session(s.engine) as ses:
        before = len(crud.list_jobs(session=ses))
    demo = build_app(s)
    demo.queue(max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, show_error=False)
    names = list(launch.LAUNCH_FIELDS)
    cases = [  # (changes to the form, words of the answer)
        ({"steps": 10**15}, "steps must be at most 10,000,000"),
        ({"warmup": 1.5}, "warmup is a fraction"),
        ({"data": "/etc/passwd"}, "must be inside a folder this dashboard may read"),
        ({"teacher": "/usr/lib"}, "must be inside a folder this dashboard may read"),
        ({"keep": "0-100000000"}, "out of range"),
        ({"data": "x" * 100_000}, "too long (100,000 characters"),
        ({"processes": 0}, "processes must be at least 1"),
    ]
    try:
        client = Client(url, verbose=False)
        for changes, words in cases:
            values = form(tmp, **changes)
            start = time.perf_counter()
            answer = client.predict(values["recipe"], *[values[n] for n in names], api_name="/launch")
            assert time.perf_counter() - start < 1.0, (changes, "slow")
            assert answer.startswith("**Not launched:**") and words in answer and len(answer) < 500, (changes, answer)
        for keep in ("0-3000000", "0-100000000"):
            start = time.perf_counter()
            text, _ = client.predict(str(tmp / "teacher"), 1, 2, 2, keep, "rule", api_name="/preview")
            assert time.perf_counter() - start < 1.0 and "out of range" in text and len(text) < 400
    finally:
        demo.close()
    for bad in (float("nan"), float("inf")):  # JSON cannot carry these; a handler can still be given them
        assert "lr must be a finite number" in launched(s, form(tmp, lr=bad))
    with Session(s.engine) as ses:
        assert len(crud.list_jobs(session=ses)) == before
    fig, table, _, message, _ = compare.compare(s, common.family_choices(s)[0][1], "quiz", "acc", False, "parameters", float("inf"))
    assert message.startswith("**Budget refused:**") and table
    with pytest.raises(Exception, match="compare at most 8 other families at once, got 100000"):
        compare.compare(s, common.family_choices(s)[0][1], "quiz", "acc", False, "parameters", None,
                  [str(i) for i in range(10**6, 10**6 + 10**5)])
    with pytest.raises(ValueError):
        compare.compare(s, common.family_choices(s)[0][1], "quiz", "acc", False, "parameters", None, ["abc"])


def test_the_chart_on_the_axes_a_deployment_cares_about_chance_normalised_and_per_task(world):
    s = world["services"]
    (_, sid), = common.family_choices(s)
    rows = compare.result_rows(s, sid)
    cost = {r["key"]: r["value"] for r in rows if r["task"] == "cost" and r["metric"] == "decode_tokens_per_s"}
    fig, table, _, msg, _ = compare.compare(s, sid, "quiz", "acc", False, "parameters", None, None, None,
                                            "decode latency (ms/token)")
    drawn = {c[0]: x for t in fig.data if t.customdata is not None for c, x in zip(t.customdata, t.x, strict=True)}
    assert drawn and all(x == pytest.approx(1000 / cost[k]) for k, x in drawn.items())
    assert fig.layout.xaxis.title.text == "decode latency (ms/token)"
    assert all(r[10] == round(1000 / cost[r[0]], 4) for r in table if r[0] in cost)  # the table's x column
    body = {r["key"]: r["params_no_embed"] for r in rows}
    fig = compare.compare(s, sid, "quiz", "acc", False, "parameters", None, None, None, "parameters without embeddings")[0]
    drawn = {c[0]: x for t in fig.data if t.customdata is not None for c, x in zip(t.customdata, t.x, strict=True)}
    assert drawn and all(x == body[k] < next(r["params"] for r in rows if r["key"] == k) for k, x in drawn.items())
    # fit my budget on the same axes: the best within 1 ms of decode latency per token (or nothing)
    fastest = min(1000 / v for v in cost.values())
    assert "Best within the budget:**" in compare.compare(s, sid, "quiz", "acc", False, "decode latency (ms/token)",
                                                          fastest * 1.0001)[3]
    # chance-normalised: quiz has 3 choices an item, so (acc - 1/3) / (2/3)
    raw = {r["key"]: r["value"] for r in rows if r["task"] == "quiz" and r["metric"] == "acc"}
    fig, _, _, msg, _ = compare.compare(s, sid, "quiz", "acc", False, "parameters", None, None, None, "parameters", True)
    drawn = {c[0]: y for t in fig.data if t.customdata is not None for c, y in zip(t.customdata, t.y, strict=True)}
    assert drawn and all(y == pytest.approx((raw[k] - 1 / 3) / (2 / 3)) for k, y in drawn.items())
    assert "0 is guessing" in msg
    fig = compare.compare(s, sid, "average", "acc", False, "parameters", None, None, None, "parameters", False, True)[0]
    assert [a.text for a in fig.layout.annotations] == ["average", "fill", "quiz"]  # a panel per task
    with pytest.raises(BoomerangError, match="unknown x axis"):
        compare.compare(s, sid, "quiz", "acc", False, "parameters", None, None, None, "vibes")


def test_fit_my_budget_computes_memory_and_says_when_latency_was_not_measured():
    rows = [{"key": f"interpolated-{n}", "series": "interpolated", "n_layers": n, "params": n * 1_000_000,
             "params_no_embed": 0, "task": "quiz", "metric": "acc", "value": n / 100, "stderr": None, "blocks": ""}
            for n in (5, 6, 7)]
    best = compare.best_within_budget(rows, "quiz", "acc", "memory (MB)", 6 * 4 / 1.048576 + 0.01)  # 6M float32 weights
    assert best["n_layers"] == 6
    with pytest.raises(BoomerangError, match="latency was not measured for this family"):
        compare.best_within_budget(rows, "quiz", "acc", "latency (ms)", 100)
    measured = rows + [{**rows[0], "task": "cost", "metric": "prefill_ms", "value": 3.0}]
    assert compare.best_within_budget(measured, "quiz", "acc", "latency (ms)", 5)["n_layers"] == 5


def test_a_teacher_is_chattable_before_any_family_is_distilled(world):
    s, tmp = world["services"], world["tmp"]
    teacher = str(tmp / "teacher")
    value = dict((v, k) for k, v in chat.chat_family_choices(s))
    assert f"cut:{teacher}" in value and "undistilled" in value[f"cut:{teacher}"]
    counts, middle = chat.size_choices(s, f"cut:{teacher}")
    assert counts == [5, 6, 7, 8]
    assert "undistilled" in chat.size_label(s, f"cut:{teacher}", 6) and "undistilled" not in chat.size_label(s, f"cut:{teacher}", 8)
    *_, (left, right, lstats, rstats) = chat.chat_turn(s, f"cut:{teacher}", 6, "hello", [], [], "", 0, 1.0, 6, "cut")
    assert left[-1]["role"] == "assistant" and "6 layers" in lstats and "teacher" in rstats
    with pytest.raises(BoomerangError, match="nothing to export: the sizes of an undistilled family"):
        chat.export_chosen(s, f"cut:{teacher}", 6)
    with pytest.raises(Exception, match="must be inside a folder this dashboard may read"):
        chat.size_choices(s, "cut:/usr/lib")


def test_a_jobs_last_checkpoint_becomes_a_family_to_chat_with_and_evaluate(world):
    # last in this module: it adds a family to the world's one
    s, job = world["services"], world["job"]
    msg = jobs.snapshot_job(s, job)
    assert msg.startswith("**Step 8 of 8 as family #") and "snapshots/step-8" in msg, msg
    choices = dict((v, k) for k, v in common.family_choices(s))
    sid = next(v for v, label in choices.items() if "snapshots/step-8" in label)
    counts, _ = chat.size_choices(s, sid)
    assert counts == [5, 6, 7, 8]
    *_, (left, _, lstats, _) = chat.chat_turn(s, sid, 6, "hello", [], [], "", 0, 1.0, 4, "snap", "auto")
    assert left[-1]["role"] == "assistant" and "6 layers" in lstats
    assert "norm and head from the teacher" in chat.size_label(s, sid, 6, "auto")
    assert jobs.snapshot_job(s, job) == msg  # the same step again: the same family
    for not_a_distillation in (world["eval"], 999):
        with pytest.raises(BoomerangError, match="pick a distillation job that has started"):
            jobs.snapshot_job(s, not_a_distillation)
    with pytest.raises(Exception, match="ends must be one of student, teacher, auto"):
        chat.size_label(s, sid, 6, "x" * 500)


def test_distilled_at_size_baselines_from_the_jobs_tab_and_families_compared_on_one_chart(world):
    # after the checkpoint test: the world now holds the run's family and its step-8 snapshot
    from boomerang.evaluation.metrics import EvalSettings
    from boomerang.evaluation.run import EvalRequest
    from workers.submit import submit

    s, job = world["services"], world["job"]
    msg = jobs.at_size_job(s, job)
    assert msg.startswith("**Queued jobs ") and "students of 6, 7 layers" in msg, msg
    ids = [int(x) for x in msg.split("**Queued jobs ")[1].split("**")[0].split(", ")]
    for jid in ids:
        assert run_job(jid, engine=s.engine, worker="test") == "SUCCEEDED"
    assert "Every distilled-at-size baseline of this run is done" in jobs.at_size_job(s, job)
    assert evaluated(s, job, "quiz", s.eval_data_dir, 5, 0) == "**Not queued:** parts must be between 1 and 64, got 0"
    msg = jobs.evaluate_job(s, job, "quiz", s.eval_data_dir, 5, 2)  # shared out: the settings say so, then cancelled
    shared = int(msg.split("job ")[1].split(" ")[0])
    assert "shared out over 2 jobs" in msg and crud.get_job(session=Session(s.engine), job_id=shared).settings["parts"] == 2
    crud.request_cancel(session=Session(s.engine), job_id=shared)
    msg = jobs.evaluate_job(s, job, "quiz", s.eval_data_dir, 5)
    assert run_job(int(msg.split("job ")[1].split(" ")[0]), engine=s.engine, worker="test") == "SUCCEEDED"
    choices = common.family_choices(s)
    with Session(s.engine) as ses:
        from db.models import Student

        folders = {str(st.id): st.folder for st in ses.exec(select(Student))}
    sid = next(v for _, v in choices if folders[v] == crud.get_job(session=Session(s.engine), job_id=job).result["student_dir"])
    fig, table, _, msg, _ = compare.compare(s, sid, "quiz", "acc", False, "parameters", None)
    assert sum(len(t.x) for t in fig.data if t.name == "distilled") == 2
    # the paper's central comparison in words, size by size, with the table's own numbers
    assert "**Interpolated sizes beside students distilled at the size**" in msg, msg
    for n in (6, 7):
        value = {r[1]: r[6] for r in table if r[2] == n and r[4] == "quiz" and r[5] == "acc"}
        assert f"- {n} layers: acc interpolated {value['interpolated']:.4g}, distilled at the size " \
               f"{value['distilled']:.4g} (" in msg, msg
    assert {r[0] for r in table if r[1] == "distilled"} == {"distilled-6", "distilled-7"}
    # a second family (the run's step-8 checkpoint), evaluated, on the same chart under one frontier
    snap = next(v for _, v in choices if folders[v].endswith("snapshots/step-8"))
    folder = folders[snap]
    req = EvalRequest.standard(folder, tasks=["quiz"], data_dir=s.eval_data_dir, settings=EvalSettings(limit=5))
    new = submit(engine=s.engine, app=s.celery, kind="eval", settings=req.to_dict(), queue=s.queue)
    assert run_job(new.id, engine=s.engine, worker="test") == "SUCCEEDED"
    fig, table, _, msg, _ = compare.compare(s, sid, "general", "perplexity", False, "parameters", None, [snap])
    names = {t.name for t in fig.data}
    assert {f"interpolated · #{sid}", f"interpolated · #{snap}", "teacher", "Pareto frontier"} <= names, names
    assert {r[0].split(":")[0] for r in table if ":" in r[0]} == {f"#{sid}", f"#{snap}"}
    assert sum(1 for r in table if r[1] == "teacher" and r[4] == "general" and r[5] == "perplexity") == 1
    # the same checkpoint's family from a families.csv (a published study's table), not from the database: the
    # same chart, the same frontier marks, under the table's family name
    from boomerang.evaluation.compare import compare_families

    written = compare_families([folder], world["tmp"] / "published", names=["snapshot"]).table
    fig2, table2, _, _, _ = compare.compare(s, sid, "general", "perplexity", False, "parameters", None, [], str(written))
    assert {f"interpolated · #{sid}", "interpolated · snapshot", "teacher"} <= {t.name for t in fig2.data}
    def general(rows, name):
        return sorted([str(c).replace(name, "FAMILY:") for c in r] for r in rows if r[4] == "general")

    assert general(table2, "snapshot:") == general(table, f"#{snap}:") and len(general(table, "")) > 10
    for bad, words in ((world["tmp"] / "nothing.csv", "no such table"), (world["tmp"] / "x.txt", "families.csv"),
                       (Path(jobs.__file__), "families.csv")):
        with pytest.raises(Exception, match=words):
            compare.compare(s, sid, "general", "perplexity", False, "parameters", None, [], str(bad))


def test_a_running_evaluation_draws_a_partial_chart_that_fills_in(tmp_path):
    """The Compare tab while an evaluation runs: what has landed is charted and marked partial; a tick redraws
    only when rows have landed since, keeping the task picked; the mark goes when the job ends."""
    from db.models import JobCreate, JobStatus

    engine = make_engine(f"sqlite:///{tmp_path / 'partial.db'}")
    s = Services(engine=engine, celery=None, models=ModelCache(), exports_dir=tmp_path / "exports")
    folder = str(tmp_path / "student")

    def row(key, series, n, task, metric, value):
        return {"key": key, "series": series, "n_layers": n, "params": n * 1000, "task": task, "metric": metric,
                "value": value, "stderr": 0.01, "cell": f"{task}.abc.json"}

    with Session(engine) as ses:
        student = crud.upsert_student(session=ses, folder=folder, manifest={}, sizes=[])
        sid = str(student.id)
        job_id = crud.create_job(session=ses, job_in=JobCreate(kind="eval", settings={"student": folder})).id
        crud.update_progress(session=ses, job_id=job_id, status=JobStatus.RUNNING, step=2, total=6)
        # the first cells of the standard order: the family's label-free metrics
        crud.record_eval_rows(session=ses, student_id=int(sid), job_id=job_id, rows=[
            row("student-4", "student", 4, "general", "kl_to_teacher", 0.9),
            row("teacher-8", "teacher", 8, "general", "kl_to_teacher", 0.0)])
    assert f"evaluation job #{job_id} is running (2 of 6 cells)" in compare.evaluation_in_progress(s, sid)
    with Session(engine) as ses:  # a newer job queued behind it: the Jobs tab still opens on the running one
        queued = crud.create_job(session=ses, job_in=JobCreate(kind="eval", settings={"student": folder})).id
    assert jobs.default_job(s) == job_id
    rest = (False, "parameters", None, [], None)
    task_u, metric_u, fig, *_, seen, note = compare.fill_in(s, sid, None, None, 0, *rest)
    assert task_u["value"] == "general" and metric_u["value"] == "kl_to_teacher" and seen == 2 and "Partial" in note
    assert sum(len(t.x) for t in fig.data if t.name in ("student", "teacher")) == 2
    skipped = compare.fill_in(s, sid, "general", "kl_to_teacher", 2, *rest)  # nothing new: nothing redrawn
    assert all(isinstance(u, dict) and u.get("__type__") == "update" and len(u) == 1 for u in skipped[:7])
    with Session(engine) as ses:  # a task's cells land; the user keeps looking at KL
        crud.record_eval_rows(session=ses, student_id=int(sid), job_id=job_id, rows=[
            row("student-4", "student", 4, "quiz", "acc", 0.4), row("teacher-8", "teacher", 8, "quiz", "acc", 0.6),
            row("interpolated-6", "interpolated", 6, "general", "kl_to_teacher", 0.4)])
        crud.finish_job(session=ses, job_id=job_id, status=JobStatus.SUCCEEDED)
        crud.finish_job(session=ses, job_id=queued, status=JobStatus.CANCELLED)
    task_u, _, fig, *_, seen, note = compare.fill_in(s, sid, "general", "kl_to_teacher", 2, *rest)
    assert task_u["value"] == "general" and "quiz" in task_u["choices"] and seen == 5 and "Partial" not in note
    assert jobs.default_job(s) == queued  # none running: the newest
    assert sum(len(t.x) for t in fig.data if t.name in ("student", "interpolated", "teacher")) == 3


def test_the_chart_opens_on_the_measurement_that_tells_the_sizes_apart():
    from boomerang.evaluation.chart import most_telling

    def row(key, series, n, task, metric, value, stderr):
        return {"key": key, "series": series, "n_layers": n, "params": n, "task": task, "metric": metric,
                "value": value, "stderr": stderr, "cell": f"{task}.k.json"}

    models = [("student-4", "student", 4), ("interpolated-6", "interpolated", 6), ("teacher-8", "teacher", 8)]
    rows = [row(k, s, n, "quiz", "acc", 0.40 + 0.02 * i, 0.05) for i, (k, s, n) in enumerate(models)]  # 0.8 se
    rows += [row(k, s, n, "general", "kl_to_teacher", 2.0 - i, 0.05 if i < 2 else 0.0) for i, (k, s, n) in enumerate(models)]
    rows += [row("drop-bi-4", "drop-bi", 4, "quiz", "acc", 0.9, 0.05)]  # a baseline's spread does not count
    task, metric, snr = most_telling(rows)
    assert (task, metric) == ("general", "kl_to_teacher") and snr == pytest.approx(2.0 / 0.05)  # the teacher's 0 se left out
    assert most_telling([{**r, "stderr": None} for r in rows]) is None
