"""End to end in a real browser (Debian chromium, driven by Playwright), a real worker and Redis.

Chat with a teacher before any family exists; choose a recipe and see the form and the plan follow;
launch a tiny distillation whose teacher writes its text, see that phase before step 1, watch it reach
SUCCEEDED, evaluate it with the dashboard's defaults (held-out text, cost, both baselines), see the
chart's points and error bars, chat with a size and the teacher, see both replies stream, press Stop.
Screenshots of the tiny family go to the test's folder; the docs' come from a real family
(scripts/screenshots.py).
"""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_eval import write_eval_files
from test_jobs import Cluster, redis_ready  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


@pytest.fixture
def stack(tmp_path, redis_ready, monkeypatch):  # noqa: F811
    from app.services import ModelCache, Services
    from app.ui import CSS, I18N, build_app

    cluster = Cluster(tmp_path)
    for key in ("DATABASE_URL", "REDIS_URL", "BOOMERANG_HOME"):
        monkeypatch.setenv(key, cluster.env[key])
    data = write_eval_files(tmp_path / "evaldata")
    services = Services(engine=cluster.engine, celery=cluster.app, models=ModelCache(), eval_data_dir=str(data),
                        eval_tasks="quiz,fill", queue=cluster.queue, exports_dir=tmp_path / "exports",
                        allowed_roots=(tmp_path,))
    demo = build_app(services)
    demo.queue(max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, css=CSS, i18n=I18N)
    cluster.start_worker("browser-worker")
    yield cluster, url
    demo.close()
    cluster.stop()


def test_launch_watch_evaluate_compare_chat_stop(stack):
    from playwright.sync_api import expect, sync_playwright

    cluster, url = stack
    shots = cluster.tmp / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        # The family preview is not empty before any click (this fresh home has not converted the default
        # teacher, so it says what the button will do rather than converting it on page load)
        expect(page.locator("#plan-preview")).to_contain_text("Preview the family")

        # Chat with a teacher before any family exists: its undistilled sizes, labelled so
        page.get_by_role("tab", name="Chat").click()
        chat_family = page.locator("#chat-family input")
        chat_family.fill(f"cut:{cluster.tmp / 'teacher'}")
        chat_family.press("Enter")
        expect(page.locator("#size-label")).to_contain_text("undistilled", timeout=30_000)
        page.locator("#max-new input[type=number]").fill("8")
        page.locator("#max-new input[type=number]").press("Enter")
        page.locator("#chat-input textarea").fill("Hello before any distillation")
        page.locator("#send-btn").click()
        try:
            expect(page.locator("#teacher-stats")).to_contain_text("8 tokens", timeout=30_000)
        except AssertionError as exc:  # say what the page said (an error's toast), not only that it differs
            raise AssertionError(f"{exc}\ntoasts: {page.locator('.toast-wrap').all_inner_texts()}; size "
                                 f"{page.locator('#chat-size input').input_value()!r}") from None
        expect(page.locator("#teacher-stats")).not_to_contain_text("…")
        page.get_by_role("tab", name="Launch").click()

        # Launch: a tiny teacher folder; the recipe choice sets every field and the preview's plan
        teacher = page.locator("#teacher input")
        teacher.fill(str(cluster.tmp / "teacher"))
        teacher.press("Enter")
        page.locator("#recipe").get_by_text("cpu", exact=True).click()
        expect(page.locator("#recipe-summary")).to_contain_text("CPU recipe")
        expect(page.locator("#kl-weight input")).to_have_value("1")
        expect(page.locator("#mix-prob input")).to_have_value("0.5")
        expect(page.locator("#plan-preview")).to_contain_text("Importance plan")  # the plan the cpu job will use
        page.locator("#recipe").get_by_text("paper", exact=True).click()
        expect(page.locator("#kl-weight input")).to_have_value("0.1")
        expect(page.locator("#plan-preview")).to_contain_text("[0, 2, 4, 6, 7]")  # back to the rule's plan
        expect(page.locator("#plan-preview")).to_contain_text("5 layers")
        # the teacher writes the training text: a phase long enough to be seen before step 1
        page.locator("#data textarea").fill("teacher")
        for elem, value in (("steps", "8"), ("batch-size", "2"), ("seq-len", "16")):
            page.locator(f"#{elem} input").fill(value)
        page.locator("#evaluate input").uncheck()  # evaluated below, from the Jobs tab, with the test's own tasks
        page.locator("#launch-btn").click()
        expect(page.locator("#launch-result")).to_contain_text("Job 1 queued")

        # Jobs: watch it to SUCCEEDED (the page polls the database every 2 s)
        page.get_by_role("tab", name="Jobs").click()
        job = page.locator("#job-id input")
        expect(job).to_have_value("1")  # the tab opens on the running (or newest) job: nothing to type
        expect(page.locator("#job-status")).to_have_attribute("data-job", "1")
        expect(page.locator("#job-detail")).to_contain_text("writing the teacher's corpus", timeout=60_000)  # before step 1
        expect(page.locator("#job-detail")).to_contain_text("tokens/s")
        expect(page.locator("#job-status")).to_have_attribute("data-status", "SUCCEEDED", timeout=120_000)
        expect(page.locator("#jobs-table")).to_contain_text("SUCCEEDED")
        expect(page.locator("#loss-curves .scatterlayer .trace")).to_have_count(4)  # total, ce, kl, cosine
        page.screenshot(path=str(shots / "jobs.png"), full_page=True)
        page.get_by_text("Evaluate this family").click()
        page.locator("#eval-btn").click()
        expect(page.locator("#job-action")).to_contain_text("Evaluation job 2 queued")

        # Compare, while the evaluation runs: a partial chart, marked so, that fills in as cells land (every 10 s)
        page.get_by_role("tab", name="Compare").click()  # opens on the newest family
        note = page.locator("#compare-note")
        expect(note).to_contain_text("Partial results", timeout=30_000)
        expect(note).to_contain_text("evaluation job #2")
        expect(note).not_to_contain_text("Partial results", timeout=180_000)  # done: the tick drew it whole
        # a point per size and per baseline size, with error bars, and what they mean
        try:
            # 4 sizes of the family, the undistilled and drop-bi baselines at the 3 sizes below the teacher
            expect(page.locator("#compare-plot .scatterlayer .point")).to_have_count(4 + 3 + 3, timeout=60_000)
        except AssertionError:
            page.screenshot(path=str(cluster.tmp / "compare-failure.png"), full_page=True)
            raise
        for series in ("undistilled", "drop-bi", "interpolated", "teacher"):
            expect(page.locator("#compare-plot .legendtext", has_text=series)).to_have_count(1)
        assert page.locator("#compare-plot .errorbar").count() >= 4 + 3 + 3  # one bar per point
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
        # what a size loses, item by item: the middle size against the teacher, counted, with McNemar's test
        page.get_by_text("What a size loses, item by item").click()
        summary = page.locator("#items-summary")
        expect(summary).to_contain_text("items: both right")
        expect(summary).to_contain_text("McNemar exact test")
        expect(summary).to_contain_text("against teacher-8 (B)")
        # a published families.csv (here: this family's own numbers, as `boomerang compare` writes them) joins
        # the chart: its student and sizes and undistilled baselines are new points; its drop-bi models and
        # teacher are the ones already drawn, measured alike, so they are drawn once
        from sqlmodel import Session

        from boomerang.evaluation.compare import compare_families
        from db import crud

        with Session(cluster.engine) as ses:
            folder = crud.get_job(session=ses, job_id=1).result["student_dir"]
        table = compare_families([folder], cluster.tmp / "published", names=["published"]).table
        page.locator("#compare-published input[type=file]").set_input_files(str(table))
        expect(page.locator("#compare-plot .legendtext", has_text="interpolated · published")).to_have_count(1)
        expect(page.locator("#compare-plot .scatterlayer .point")).to_have_count(4 + 3 + 3 + 3 + 3)

        # Chat: both sides stream at once; Stop ends both
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#size-label")).to_contain_text("7 layers", timeout=30_000)  # the middle of 5, 6, 7, 8
        page.locator("#chat-size input").click()
        options = page.get_by_role("option")
        expect(options).to_have_count(4)  # only the sizes the family has
        assert [o.split()[-1] for o in options.all_inner_texts()] == ["5", "6", "7", "8"]  # "✓ 7": the picked one
        page.keyboard.press("Escape")
        expect(page.locator("#temperature input[type=number]")).to_have_value("0")  # greedy by default
        page.locator("#max-new input[type=number]").fill("4096")  # long enough to be stopped half-way
        # (at ~50 tokens/s a tiny size needs over a minute for 4,096 tokens; 512 once ran out before the Stop click landed)
        page.locator("#max-new input[type=number]").press("Enter")
        page.locator("#chat-input textarea").fill("Tell me a long story.")
        page.locator("#send-btn").click()
        expect(page.locator("#size-stats")).to_contain_text("…")  # still streaming
        expect(page.locator("#teacher-stats")).to_contain_text("…")
        expect(page.locator("#send-btn")).to_be_disabled()  # nothing typed now can be lost
        page.screenshot(path=str(shots / "chat.png"), full_page=True)
        page.locator("#stop-btn").click()
        expect(page.locator("#size-stats")).not_to_contain_text("…", timeout=30_000)
        expect(page.locator("#send-btn")).to_be_enabled()
        stats = page.locator("#size-stats").inner_text()
        tokens = int(re.search(r"(\d+) tokens", stats).group(1))
        assert 0 < tokens < 4096, stats
        assert page.locator("#chat-size-bot").inner_text().strip() and page.locator("#chat-teacher-bot").inner_text().strip()
        assert "common." not in page.locator("body").inner_text()  # no untranslated Gradio key in the page
        browser.close()


@contextmanager
def opened(demo, **options):
    """A small Blocks served on localhost and opened in chromium: yields the page; closes both after."""
    from playwright.sync_api import sync_playwright

    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **options)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(url)
            yield page
            browser.close()
    finally:
        demo.close()


def test_no_untranslated_gradio_key_is_announced(tmp_path):
    """Gradio announces a finished event as `common.complete`, a key its English strings lack; the
    dashboard's I18N (what `boomerang app` launches with) supplies it. Without it the raw key shows."""
    import gradio as gr

    from app.ui import I18N

    seen = {}
    for name, options in (("plain", {}), ("ours", {"i18n": I18N})):
        with gr.Blocks() as demo:
            button, out = gr.Button("go"), gr.Textbox(elem_id="out")
            button.click(lambda: "done", None, out)
        with opened(demo, **options) as page:
            page.get_by_text("go").click()
            page.wait_for_function("document.querySelector('#out textarea').value == 'done'")
            texts = set()
            for _ in range(70):  # the announcement comes within 5 s and lasts about 1 s
                texts.add(page.locator("body").inner_text())
                page.wait_for_timeout(100)
        seen[name] = " ".join(texts)
    assert "common.complete" in seen["plain"]  # the check can see the bug
    assert "common.complete" not in seen["ours"] and "Complete" in seen["ours"]


def test_a_degenerate_reply_streaming_into_the_chat_panes_leaves_the_page_responsive():
    """Small sizes write text like "1. 1. 1. …" or "> > > …" or "$$$…"; rendered as Markdown or LaTeX and
    re-parsed at every streamed update, such a reply froze the page for over a minute (a Stop click
    timed out in CI). The chat panes (`reply_pane`) show text as written: a click still lands at once."""
    import time

    import gradio as gr
    from playwright.sync_api import expect

    from app.chat import reply_pane

    def stream():
        text = ""
        for i in range(600):  # 30 s at most; the test stops it long before
            text += ("1. " * 60, "> " * 90, "$" * 180)[i % 3]
            reply = [{"role": "user", "content": "go"}, {"role": "assistant", "content": text}]
            yield reply, reply
            time.sleep(0.05)

    with gr.Blocks() as demo:
        left, right = reply_pane("This size", "left"), reply_pane("Teacher", "right")
        go, ping, pings = gr.Button("go", elem_id="go"), gr.Button("ping", elem_id="ping"), gr.Number(0, elem_id="pings")
        streaming = go.click(stream, None, [left, right])
        ping.click(lambda n: n + 1, pings, pings, queue=False, cancels=[streaming])
    with opened(demo) as page:
        page.locator("#go").click()
        # ~10,000 characters of each pattern's text in each pane (the Markdown panes froze by then)
        page.wait_for_function("document.querySelector('#left').innerText.length > 30000", timeout=60_000)
        page.locator("#ping").click(timeout=10_000)
        expect(page.locator("#pings input")).to_have_value("1", timeout=10_000)
        assert "1. 1. 1." in page.locator("#left").inner_text()  # shown as written, not as nested lists
