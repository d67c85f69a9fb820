"""The Blocks: four tabs, each built by its own module (`app.launch`, `app.jobs`, `app.compare`, `app.chat`).
`build_app(services)` is the only entry point."""

from __future__ import annotations

import gradio as gr

from app import chat, compare, jobs, launch
from app.common import CUT, family_choices, safe

I18N = gr.I18n(en={"common.complete": "Complete"})
"""Gradio's status tracker announces a finished event with the key `common.complete`, which its English
strings lack (they have `chatbot.complete`): without this the raw key lands in the page's text."""
CSS = ".job-error{color:#d62728;font-weight:600} .stats{font-size:0.85em;color:#555}"


def build_app(services) -> gr.Blocks:
    with gr.Blocks(title="Boomerang Studio") as demo:
        gr.Markdown("# Boomerang Studio\nOne teacher, a whole family of sizes: distill, watch, compare, chat.")
        with gr.Tabs():
            with gr.Tab("Launch", id="launch"):
                preview = launch.tab(services)
            with gr.Tab("Jobs", id="jobs") as jobs_tab:
                job_id = jobs.tab(services)
            with gr.Tab("Compare", id="compare") as compare_tab:
                family_c, show_compare = compare.tab(services)
            with gr.Tab("Chat", id="chat") as chat_tab:
                family_chat, show_chat = chat.tab(services)

        for tab, dropdown, show, choices in ((compare_tab, family_c, show_compare, family_choices),
                                             (chat_tab, family_chat, show_chat, chat.chat_family_choices)):
            _refresh_on_open(services, tab, dropdown, show, choices)
        # the Jobs tab opens on the running (or newest) job, with its curves, unless the user picked one
        jobs_tab.select(safe(lambda jid: jid or jobs.default_job(services)), job_id, job_id, api_name=False)
        demo.load(*preview, api_name=False)  # the family preview is filled without a click
    return demo


def _refresh_on_open(services, tab, dropdown, show, family_choices) -> None:
    """Opening a tab reloads the families (newest first), keeps the user's pick or takes the newest,
    and shows it, in one event: a chained event could still see the dropdown's old value."""
    fn, inputs, outputs = show

    def open_tab(current, *rest):
        choices = family_choices(services)
        values = [v for _, v in choices]
        distilled = [v for v in values if not str(v).startswith(CUT)]
        # keep a distilled family the user picked; otherwise the newest one, else the undistilled sizes of a
        # teacher that loads at once (never one that would be converted or downloaded just by opening the tab)
        keep = current in values and not str(current).startswith(CUT)
        value = current if keep else (distilled or [v for v in values if chat.loads_at_once(v)] or [None])[0]
        return gr.update(choices=choices, value=value), *fn(value, *rest)

    tab.select(safe(open_tab), [dropdown, *inputs[1:]], [dropdown, *outputs])
