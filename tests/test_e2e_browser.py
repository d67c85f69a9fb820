"""End to end in a real browser (Debian chromium, driven by Playwright), a real worker and Redis.

Launch a tiny distillation from the form, watch it reach SUCCEEDED, evaluate it, see the chart's
points, chat with a size and the teacher, see both replies stream, press Stop. Screenshots of each
page go to docs/screenshots/.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_eval import write_eval_files
from test_jobs import Cluster, redis_ready  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


@pytest.fixture
def stack(tmp_path, redis_ready, monkeypatch):  # noqa: F811
    from app.services import ModelCache, Services
    from app.ui import CSS, build_app

    cluster = Cluster(tmp_path)
    for key in ("DATABASE_URL", "REDIS_URL", "BOOMERANG_HOME"):
        monkeypatch.setenv(key, cluster.env[key])
    data = write_eval_files(tmp_path / "evaldata")
    services = Services(engine=cluster.engine, celery=cluster.app, models=ModelCache(), eval_data_dir=str(data),
                        eval_tasks="quiz,fill", queue=cluster.queue, exports_dir=tmp_path / "exports",
                        allowed_roots=(tmp_path,))
    demo = build_app(services)
    demo.queue(max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, css=CSS)
    cluster.start_worker("browser-worker")
    yield cluster, url
    demo.close()
    cluster.stop()


def test_launch_watch_evaluate_compare_chat_stop(stack):
    from playwright.sync_api import expect, sync_playwright

    cluster, url = stack
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)

        # Launch: a tiny teacher folder, previewed, then queued
        teacher = page.locator("#teacher input")
        teacher.fill(str(cluster.tmp / "teacher"))
        teacher.press("Enter")
        page.locator("#data textarea").fill(str(cluster.tmp / "corpus.txt"))
        for elem, value in (("steps", "8"), ("batch-size", "2"), ("seq-len", "16")):
            page.locator(f"#{elem} input").fill(value)
        page.locator("#preview-btn").click()
        expect(page.locator("#plan-preview")).to_contain_text("5 layers")
        page.screenshot(path=str(SHOTS / "launch.png"), full_page=True)
        page.locator("#launch-btn").click()
        expect(page.locator("#launch-result")).to_contain_text("Job 1 queued")

        # Jobs: watch it to SUCCEEDED (the page polls the database every 2 s)
        page.get_by_role("tab", name="Jobs").click()
        job = page.locator("#job-id input")
        job.fill("1")
        job.press("Enter")
        expect(page.locator("#job-status")).to_have_attribute("data-job", "1")
        expect(page.locator("#job-status")).to_have_attribute("data-status", "SUCCEEDED", timeout=120_000)
        expect(page.locator("#jobs-table")).to_contain_text("SUCCEEDED")
        expect(page.locator("#loss-curves .scatterlayer .trace")).to_have_count(4)  # total, ce, kl, cosine
        page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)
        page.get_by_text("Evaluate this family").click()
        page.locator("#eval-btn").click()
        expect(page.locator("#job-action")).to_contain_text("Evaluation job 2 queued")
        job.fill("2")
        job.press("Enter")
        expect(page.locator("#job-status")).to_have_attribute("data-job", "2")  # not job 1's old status
        expect(page.locator("#job-status")).to_have_attribute("data-status", "SUCCEEDED", timeout=180_000)

        # Compare: the chart has a point per size
        page.get_by_role("tab", name="Compare").click()  # opens on the newest family
        try:
            expect(page.locator("#compare-plot .scatterlayer .point")).to_have_count(4, timeout=60_000)  # one per size
        except AssertionError:
            page.screenshot(path=str(cluster.tmp / "compare-failure.png"), full_page=True)
            raise
        page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)

        # Chat: both sides stream at once; Stop ends both
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#size-label")).to_contain_text("7 layers", timeout=30_000)  # the middle of 5, 6, 7, 8
        page.locator("#chat-size input").click()
        options = page.get_by_role("option")
        expect(options).to_have_count(4)  # only the sizes the family has
        assert [o.split()[-1] for o in options.all_inner_texts()] == ["5", "6", "7", "8"]  # "✓ 7": the picked one
        page.keyboard.press("Escape")
        expect(page.locator("#temperature input[type=number]")).to_have_value("0")  # greedy by default
        page.locator("#max-new input[type=number]").fill("512")  # long enough to be stopped half-way
        page.locator("#max-new input[type=number]").press("Enter")
        page.locator("#chat-input textarea").fill("Tell me a long story.")
        page.locator("#send-btn").click()
        expect(page.locator("#size-stats")).to_contain_text("…")  # still streaming
        expect(page.locator("#teacher-stats")).to_contain_text("…")
        expect(page.locator("#send-btn")).to_be_disabled()  # nothing typed now can be lost
        page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)
        page.locator("#stop-btn").click()
        expect(page.locator("#size-stats")).not_to_contain_text("…", timeout=30_000)
        expect(page.locator("#send-btn")).to_be_enabled()
        stats = page.locator("#size-stats").inner_text()
        tokens = int(re.search(r"(\d+) tokens", stats).group(1))
        assert 0 < tokens < 512, stats
        assert page.locator("#chat-size-bot").inner_text().strip() and page.locator("#chat-teacher-bot").inner_text().strip()
        browser.close()
