"""The Blocks: four tabs wired to `app.handlers`. `build_app(services)` is the only entry point."""

from __future__ import annotations

import functools
import logging
import re
import uuid

import gradio as gr

from app import handlers as h
from boomerang.errors import BoomerangError, excerpt
from boomerang.evaluation.task_files import shipped_tasks

log = logging.getLogger("boomerang.app")

EVAL_LIMIT = 100
"""Items per task the Evaluate form starts with: every shipped task's first 100 (one standard error about 0.05)."""
I18N = gr.I18n(en={"common.complete": "Complete"})
"""Gradio's status tracker announces a finished event with the key `common.complete`, which its English
strings lack (they have `chatbot.complete`): without this the raw key lands in the page's text."""
CSS = ".job-error{color:#d62728;font-weight:600} .stats{font-size:0.85em;color:#555}"


def safe(fn):
    """`fn` for an event: a user's error (BoomerangError, ValueError) becomes a short message in the page,
    anything else a one-line 'went wrong' with the details in the server log; never a traceback in the browser."""
    import inspect

    def short(exc: Exception) -> gr.Error:
        if isinstance(exc, (BoomerangError, ValueError)):
            return gr.Error(excerpt(str(exc), 400).strip("'\""), print_exception=False)
        log.exception("dashboard handler failed")
        return gr.Error(f"Something went wrong ({type(exc).__name__}); the server log has the details.",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args):
            try:
                yield from fn(*args)
            except gr.Error:
                raise
            except Exception as exc:
                raise short(exc) from None
        return stream

    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as exc:
            raise short(exc) from None
    return call


def bind(handler, services):
    """A handler of app.handlers with its services bound, made safe for the browser."""
    return safe(functools.partial(handler, services))


def build_app(services) -> gr.Blocks:
    with gr.Blocks(title="Boomerang Studio") as demo:
        gr.Markdown("# Boomerang Studio\nOne teacher, a whole family of sizes: distill, watch, compare, chat.")
        with gr.Tabs():
            with gr.Tab("Launch", id="launch"):
                preview = _launch_tab(services)
            with gr.Tab("Jobs", id="jobs"):
                _jobs_tab(services)
            with gr.Tab("Compare", id="compare") as compare_tab:
                family_c, show_compare = _compare_tab(services)
            with gr.Tab("Chat", id="chat") as chat_tab:
                family_chat, show_chat = _chat_tab(services)

        for tab, dropdown, show, choices in ((compare_tab, family_c, show_compare, h.family_choices),
                                             (chat_tab, family_chat, show_chat, h.chat_family_choices)):
            _refresh_on_open(services, tab, dropdown, show, choices)
        demo.load(*preview, api_name=False)  # the family preview is filled without a click
    return demo


def _refresh_on_open(services, tab, dropdown, show, family_choices) -> None:
    """Opening a tab reloads the families (newest first), keeps the user's pick or takes the newest,
    and shows it, in one event: a chained event could still see the dropdown's old value."""
    fn, inputs, outputs = show

    def open_tab(current, *rest):
        choices = family_choices(services)
        values = [v for _, v in choices]
        distilled = [v for v in values if not str(v).startswith(h.CUT)]
        # keep a distilled family the user picked; otherwise the newest one, else the undistilled sizes of a
        # teacher that loads at once (never one that would be converted or downloaded just by opening the tab)
        keep = current in values and not str(current).startswith(h.CUT)
        value = current if keep else (distilled or [v for v in values if h.loads_at_once(v)] or [None])[0]
        return gr.update(choices=choices, value=value), *fn(value, *rest)

    tab.select(safe(open_tab), [dropdown, *inputs[1:]], [dropdown, *outputs])


LABELS = {"keep_first": "Keep first", "every": "Every", "keep_last": "Keep last", "keep": "Or keep exactly these teacher layers",
          "plan": "Plan", "data": "Training data", "steps": "Steps", "batch_size": "Batch size",
          "seq_len": "Sequence length", "lr": "Learning rate", "warmup": "Warm-up", "ce_weight": "CE weight",
          "kl_weight": "KL weight", "cosine_weight": "Cosine weight", "mse_weight": "Norm (MSE) weight",
          "local_weight": "Blockwise weight", "mix_prob": "Mixed sizes", "freeze_embeddings": "Freeze embeddings",
          "freeze_head": "Freeze head", "freeze_single_blocks": "Freeze single-layer blocks", "processes": "Processes",
          "fsdp": "FSDP", "evaluate": "Evaluate when done"}
ROWS = (("keep_first", "every", "keep_last"), ("keep", "plan"), ("data",), ("steps", "batch_size", "seq_len"),
        ("lr", "warmup", "mix_prob"), ("ce_weight", "kl_weight", "cosine_weight", "mse_weight", "local_weight"),
        ("freeze_embeddings", "freeze_head", "freeze_single_blocks"), ("processes", "fsdp", "evaluate"))
"""The launch form's layout: rows of DistillConfig fields (every name in handlers.LAUNCH_FIELDS but the teacher)."""


def _field(name: str, value, kind, doc: str):
    """One launch-form component for a DistillConfig field, from its type, value and docstring."""
    info = re.split(r"(?<!e\.g)\. ", doc)[0].rstrip(".")  # the docstring's first sentence
    common = {"label": LABELS.get(name, name), "info": info, "elem_id": name.replace("_", "-")}
    if kind is bool:
        return gr.Checkbox(value, **common)
    if kind is int:
        return gr.Number(value, precision=0, **common)
    if kind is float:
        return gr.Number(value, **common)
    if name == "plan":
        return gr.Radio(["rule", "importance"], value=value, **common)
    return gr.Textbox(value, **common)


def _launch_tab(services):
    """The launch form; returns the preview event (fn, inputs, outputs) the page runs when it loads."""
    import typing

    from boomerang.settings import field_docs
    from boomerang.training.recipe import DistillConfig, recipe_names

    docs, hints = field_docs(DistillConfig), typing.get_type_hints(DistillConfig)
    values = h.form_values("paper")
    fields = {}
    with gr.Row():
        with gr.Column(scale=3):
            fields["teacher"] = gr.Dropdown(h.teacher_choices(services), value="default", allow_custom_value=True,
                                            label="Teacher", elem_id="teacher",
                                            info="the embedded SmolLM2-135M-Instruct, a hub id, a local folder or a .gguf file")
            for row in ROWS[:2]:
                with gr.Row():
                    for name in row:
                        fields[name] = _field(name, values[name], hints[name], docs[name])
            preview_btn = gr.Button("Preview the family", elem_id="preview-btn")
            preview_md = gr.Markdown(elem_id="plan-preview")
            preview_table = gr.Dataframe(headers=["layers", "params", "without embeddings", "size"], interactive=False)
        with gr.Column(scale=2):
            recipe = gr.Radio(list(recipe_names()), value="paper", label="Recipe", elem_id="recipe",
                              info="paper: the paper's settings; cpu: the best found for a CPU's budget "
                                   "(docs/distillation.md); every field below follows it")
            summary = gr.Markdown(h.recipe_summary("paper"), elem_id="recipe-summary")
            for row in ROWS[2:]:
                with gr.Row():
                    for name in row:
                        fields[name] = _field(name, values[name], hints[name], docs[name])
            estimate_md = gr.Markdown(elem_id="launch-estimate")
            launch_btn = gr.Button("Launch distillation", variant="primary", elem_id="launch-btn")
            launch_md = gr.Markdown(elem_id="launch-result")
    names = list(h.LAUNCH_FIELDS)
    assert set(names) == set(fields), "ROWS and LAUNCH_FIELDS must name the same fields"
    components = [fields[n] for n in names]
    plan_inputs = [fields[n] for n in ("teacher", "keep_first", "every", "keep_last", "keep")]
    preview_btn.click(bind(h.preview_plan, services), [*plan_inputs, fields["plan"]], [preview_md, preview_table],
                      api_name="preview")

    recipe_fields = [n for n in names if n not in ("teacher", "evaluate")]  # evaluate: the user's, not a recipe's

    def pick_recipe(name):
        chosen = h.form_values(name)
        return h.recipe_summary(name), *[chosen[n] for n in recipe_fields]

    # the preview follows the recipe at once: the cpu recipe's importance plan is not the paper's rule plan
    recipe.change(safe(pick_recipe), recipe, [summary, *[fields[n] for n in recipe_fields]]).then(
        bind(h.preview_plan, services), [*plan_inputs, fields["plan"]], [preview_md, preview_table], api_name=False)

    def launch(recipe_name, *form):
        return h.launch_job(services, {"recipe": recipe_name, **dict(zip(names, form))})

    launch_btn.click(safe(launch), [recipe, *components], launch_md, api_name="launch")
    estimate_inputs = [fields[n] for n in ("teacher", "data", "steps", "batch_size", "seq_len", "mix_prob", "plan")]
    for name in ("teacher", "data", "steps", "batch_size", "seq_len", "mix_prob", "plan"):
        fields[name].change(bind(h.launch_estimate, services), estimate_inputs, estimate_md,
                            api_name=False, show_progress="hidden")
    def on_load(*values):
        n = len(plan_inputs) + 1
        return *h.preview_on_load(services, *values[:n]), h.launch_estimate(services, *values[n:])

    return safe(on_load), [*plan_inputs, fields["plan"], *estimate_inputs], [preview_md, preview_table, estimate_md]


def _jobs_tab(services) -> None:
    table = gr.Dataframe(h.jobs_table(services), headers=h.JOB_COLUMNS, interactive=False, elem_id="jobs-table")
    with gr.Row():
        job_id = gr.Number(label="Job", precision=0, elem_id="job-id")
        cancel_btn = gr.Button("Cancel", elem_id="cancel-btn")
        retry_btn = gr.Button("Retry / resume", elem_id="retry-btn")
        snap_btn = gr.Button("Family from the last checkpoint", elem_id="snapshot-btn")
    status = gr.HTML(elem_id="job-detail")
    curves = gr.Plot(label="Loss terms", elem_id="loss-curves")
    log = gr.Textbox(label="Last log lines", lines=6, max_lines=12, elem_id="job-log")
    with gr.Accordion("Evaluate this family", open=False):
        with gr.Row():
            tasks = gr.Textbox(services.eval_tasks or ", ".join(shipped_tasks()), label="Tasks", elem_id="eval-tasks",
                               info="shipped with the project (offline), file stems in the data folder, or lm-eval names")
            data_dir = gr.Textbox(services.eval_data_dir or "", label="Evaluation data folder (optional)")
            limit = gr.Number(EVAL_LIMIT, precision=0, label="Items per task")
        gr.Markdown("Also measured: perplexity, KL to the teacher and top-1 agreement on the run's held-out text "
                    "and on general text of another domain, memory and latency, and the undistilled and "
                    "layer-dropping baselines at every size.")
        with gr.Row():
            eval_btn = gr.Button("Evaluate", elem_id="eval-btn")
            at_size_btn = gr.Button("Add distilled-at-size baselines", elem_id="at-size-btn")
    action_md = gr.Markdown(elem_id="job-action")
    timer = gr.Timer(2.0)

    def refresh(jid):
        status_html, curve_rows, log_text = h.job_detail(services, jid)
        return h.jobs_table(services), status_html, h.loss_figure(curve_rows), log_text

    timer.tick(safe(refresh), job_id, [table, status, curves, log], show_progress="hidden", api_name=False)
    job_id.change(safe(refresh), job_id, [table, status, curves, log])
    def on_select(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else None

    table.select(on_select, None, job_id)
    cancel_btn.click(bind(h.cancel_job, services), job_id, action_md, api_name="cancel")
    retry_btn.click(bind(h.retry_job, services), job_id, action_md)
    snap_btn.click(bind(h.snapshot_job, services), job_id, action_md, api_name="snapshot")
    at_size_btn.click(bind(h.queue_at_size, services), job_id, action_md, api_name="at_size")
    eval_btn.click(bind(h.evaluate_job, services), [job_id, tasks, data_dir, limit], action_md)


def _compare_tab(services):
    with gr.Row():
        family = gr.Dropdown(h.family_choices(services), label="Family", elem_id="compare-family", allow_custom_value=True)
        task = gr.Dropdown([], label="Task (or average)", elem_id="compare-task")
        metric = gr.Dropdown([], label="Metric", elem_id="compare-metric")
        log_x = gr.Checkbox(False, label="Log parameter axis")
    with gr.Row():
        budget_kind = gr.Radio(["parameters", "memory (MB)", "latency (ms)"], value="parameters", label="Fit my budget")
        budget = gr.Number(None, label="Budget")
        others = gr.Dropdown(h.family_choices(services), value=[], multiselect=True, label="Compare with",
                             elem_id="compare-others", info="other families of the same teacher (recipes, budgets, "
                             "checkpoints): one chart, one Pareto frontier")
        published = gr.File(None, file_types=[".csv"], type="filepath", label="…and a families.csv (boomerang compare)",
                            elem_id="compare-published", height=120)
    budget_md = gr.Markdown(elem_id="budget-result")
    plot = gr.Plot(elem_id="compare-plot")
    table = gr.Dataframe(headers=["model", "series", "layers", "params", "task", "metric", "value", "stderr", "pareto"],
                         interactive=False)
    csv_file = gr.File(label="Download CSV")

    def pick_family(student_id):
        if not student_id:
            return gr.update(), gr.update()
        tasks, metrics = h.task_metric_choices(services, student_id)
        default_metric = "acc" if "acc" in metrics else (metrics[0] if metrics else None)
        return (gr.update(choices=tasks, value=tasks[0] if tasks else None),
                gr.update(choices=metrics, value=default_metric))

    inputs = [family, task, metric, log_x, budget_kind, budget, others, published]
    outputs = [plot, table, csv_file, budget_md]
    # the chart follows the family's defaults at once, then every change the user makes
    def show_family(student_id, *rest):
        task_update, metric_update = pick_family(student_id)
        t = task_update.get("value") if isinstance(task_update, dict) else None
        m = metric_update.get("value") if isinstance(metric_update, dict) else None
        others_update = gr.update(choices=[c for c in h.family_choices(services) if c[1] != student_id])
        return (task_update, metric_update, others_update, *h.compare(services, student_id, t, m, *rest))

    show = (show_family, [family, log_x, budget_kind, budget, others, published], [task, metric, others, *outputs])
    family.input(safe(show[0]), *show[1:])
    for control in (task, metric, budget):
        control.input(bind(h.compare, services), inputs, outputs)
    for control in (log_x, budget_kind, published):
        control.change(bind(h.compare, services), inputs, outputs)
    others.input(bind(h.compare, services), inputs, outputs)
    return family, show


def reply_pane(label: str, elem_id: str) -> gr.Chatbot:
    """A chat pane that shows each reply's text as the model wrote it: no Markdown, no LaTeX.

    Small sizes write degenerate text ("1. 1. 1. …", "> > > …", "$$$…") whose Markdown or LaTeX parse
    grows much faster than its length; re-parsed at every streamed update, it froze the page (a Stop
    click waited over a minute). Plain text also shows a size's output exactly, markup and all.
    """
    return gr.Chatbot(label=label, elem_id=elem_id, height=360, render_markdown=False, latex_delimiters=[])


def _chat_tab(services):
    from boomerang.family import ENDS

    stop = gr.State(lambda: uuid.uuid4().hex)  # a token: the session's stop event lives in services.stops
    with gr.Row():
        family = gr.Dropdown(h.chat_family_choices(services), value=None, label="Family", elem_id="chat-family",
                             allow_custom_value=True, info="a distilled family, or a teacher's undistilled sizes")
        # only the sizes the family has; a number typed through the API is checked against the family
        size = gr.Dropdown([], value=None, allow_custom_value=True, label="Size (layers)", elem_id="chat-size")
        ends = gr.Radio(list(ENDS), value="student", label="Ends", elem_id="chat-ends",
                        info="whose embeddings and final norm + head the sizes between student and teacher use "
                             "(auto: the teacher's on the patched side, as the paper's code)")
        size_md = gr.Markdown(elem_id="size-label")
    with gr.Row():
        system = gr.Textbox("", label="System prompt", scale=3)
        # greedy by default: side by side, the same prompt should get each model's most likely answer
        temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
        top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p")
        max_new = gr.Slider(8, 4096, value=128, step=8, label="Max new tokens", elem_id="max-new")
    with gr.Row():
        with gr.Column():
            left = reply_pane("This size", "chat-size-bot")
            left_stats = gr.Markdown(elem_id="size-stats", elem_classes="stats")
        with gr.Column():
            right = reply_pane("Teacher", "chat-teacher-bot")
            right_stats = gr.Markdown(elem_id="teacher-stats", elem_classes="stats")
    message = gr.Textbox(label="Message", placeholder="Ask both at once", elem_id="chat-input")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="send-btn")
        stop_btn = gr.Button("Stop", elem_id="stop-btn")
        regen = gr.Button("Regenerate")
        clear = gr.Button("Clear")
        export_btn = gr.Button("Export this size")
    export_md = gr.Markdown(elem_id="export-result")
    serve_md = gr.Markdown(elem_id="serve-snippet")
    last = gr.State("")

    def pick_family(student_id):
        sizes = h.size_choices(services, student_id)
        if sizes is None:
            return gr.update(), ""
        counts, middle = sizes
        return gr.update(choices=counts, value=middle), h.size_label(services, student_id, middle)

    family.input(safe(pick_family), family, [size, size_md])
    size.change(bind(h.size_label, services), [family, size, ends], size_md)
    ends.change(bind(h.size_label, services), [family, size, ends], size_md)
    size.change(bind(h.serving_snippet, services), [family, size], serve_md)
    turn_inputs = [family, size, message, left, right, system, temperature, top_p, max_new, stop, ends]
    outputs = [left, right, left_stats, right_stats]
    # Send and the message box are off while both replies stream: nothing typed meanwhile is lost
    def locked():
        return gr.update(interactive=False), gr.update(interactive=False)

    def unlocked(text):
        return gr.update(value="", interactive=True), text, gr.update(interactive=True)

    go = send.click(locked, None, [send, message], queue=False, api_name=False).then(
        bind(h.chat_turn, services), turn_inputs, outputs, api_name="chat")
    sub = message.submit(locked, None, [send, message], queue=False, api_name=False).then(
        bind(h.chat_turn, services), turn_inputs, outputs, api_name=False)
    for event in (go, sub):
        event.then(unlocked, message, [message, last, send], api_name=False)

    def stop_both(token):
        services.stop_event(token).set()
        return gr.update(interactive=True), gr.update(interactive=True)

    # no `cancels=`: cancelling the turn could land before its last yield and leave "…" on the stats; the
    # stop event ends both generation threads within a token, and the turn then yields its final stats
    stop_btn.click(stop_both, stop, [send, message], queue=False, api_name="stop")

    def drop_last(lhist, rhist, text):
        return lhist[:-2], rhist[:-2], text

    regen.click(drop_last, [left, right, last], [left, right, message]).then(
        bind(h.chat_turn, services), turn_inputs, outputs)
    clear.click(lambda: ([], [], "", ""), None, outputs)
    export_btn.click(bind(h.export_chosen, services), [family, size, ends], export_md)
    return family, (pick_family, [family], [size, size_md])
