"""Retake the README's and docs' screenshots from a running dashboard and the family it holds.

Meant for the quick-start's real family (the default teacher distilled by `bash scripts/setup.sh`
and evaluated by its follow-up job), so the pictures show what a new user gets, not a test model:

    bash scripts/setup.sh                                  # (or bench/first_run.sh), then, once job 2 SUCCEEDED:
    .venv/bin/python scripts/screenshots.py [--url http://127.0.0.1:7860] [--out docs/screenshots]

Drives Debian's chromium with Playwright (never `playwright install`). Writes launch.png, jobs.png,
compare.png and chat.png.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "screenshots"))
    p.add_argument("--job", default="1", help="the distillation job to show on the Jobs tab")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(args.url)

        expect(page.locator("#plan-preview")).to_contain_text("The family has")  # filled on load
        page.locator("#recipe").get_by_text("cpu", exact=True).click()
        expect(page.locator("#plan-preview")).to_contain_text("Importance plan")
        page.screenshot(path=str(out / "launch.png"), full_page=True)

        page.get_by_role("tab", name="Jobs").click()
        job = page.locator("#job-id input")
        job.fill(args.job)
        job.press("Enter")
        expect(page.locator("#job-status")).to_have_attribute("data-job", args.job)
        expect(page.locator("#loss-curves .scatterlayer .trace").first).to_be_visible()
        page.screenshot(path=str(out / "jobs.png"), full_page=True)

        page.get_by_role("tab", name="Compare").click()  # opens on the newest family
        expect(page.locator("#compare-plot .scatterlayer .point").first).to_be_visible()
        page.wait_for_timeout(1000)  # the plot's transition
        page.screenshot(path=str(out / "compare.png"), full_page=True)

        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#size-label")).to_contain_text("layers")
        page.locator("#chat-input textarea").fill(args.prompt)
        page.locator("#send-btn").click()
        expect(page.locator("#send-btn")).to_be_enabled()  # both replies ended
        page.screenshot(path=str(out / "chat.png"), full_page=True)
        browser.close()
    for name in ("launch", "jobs", "compare", "chat"):
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
