"""The Launch tab: pick a teacher, a plan and a recipe, preview the family, queue a distillation.

The form is built from DistillConfig's fields (types, defaults, docstrings); a recipe fills it, the
user's values go over the recipe's (`boomerang.training.resolve.resolve_config`).
"""

from __future__ import annotations

import dataclasses
import re
import typing

import gradio as gr

from app.common import (
    USER_ERRORS,
    bind,
    check_sources,
    check_text,
    patched_text,
    quick_to_load,
    reported,
    safe,
    teacher_choices,
)
from boomerang import data as d
from boomerang.family import Family
from boomerang.models import boomerang_home
from boomerang.plan import parse_layer_list
from boomerang.progress import format_eta
from boomerang.settings import field_docs
from boomerang.student import cut_student
from boomerang.training import timing
from boomerang.training.memory import estimate_for
from boomerang.training.recipe import PRECISIONS, DistillConfig, named_recipe, recipe_names
from boomerang.training.resolve import resolve_config
from workers.submit import submit

PLAN_REFUSED = "Cannot use this plan"
"""How the page words a plan it refuses (the error follows)."""


def _plan_settings(keep_first, every, keep_last, keep) -> dict:
    out = {"keep_first": int(keep_first), "every": int(every), "keep_last": int(keep_last)}
    if keep and str(keep).strip():
        out["keep"] = parse_layer_list(str(keep))
    return out


def launch_estimate(services, teacher: str, data: str, steps, batch_size, seq_len, mix_prob, plan: str = "rule") -> str:
    """Roughly how long the form's job takes on this machine, from the rates earlier runs of the same teacher
    measured here (boomerang.training.timing); says so when none was measured."""
    source = (teacher or "default").strip()
    if not quick_to_load(source):
        return ""
    try:
        check_sources(services, source)
        fingerprint = services.models.teacher(source).fingerprint
        steps, tokens = int(steps), int(batch_size) * int(seq_len)
    except USER_ERRORS:
        return ""  # the launch itself says what is wrong with the form
    docs = DistillConfig.teacher_docs
    writes = (data or "").strip() == "teacher" and not d.teacher_corpus_path(
        fingerprint, docs, DistillConfig.seed, boomerang_home() / "corpora").is_file()
    lines = []
    for device in ("cuda", "cpu"):
        est = timing.estimate(fingerprint, device, steps=steps, tokens_per_step=tokens, mixed=bool(float(mix_prob or 0)),
                              corpus_tokens=docs * d.TEACHER_DOC_TOKENS if writes else 0, importance=plan == "importance")
        if est:
            parts = ", ".join(f"{name} {format_eta(sec)}" for name, sec in est.parts.items())
            lines.append(f"**About {format_eta(est.seconds)} on {device}** ({parts}; from the rates a run of this "
                         f"teacher measured here, {est.measured_at}).")
    if not lines:
        return ("**Duration:** no run of this teacher has been timed on this machine yet; the quick-start job "
                "(`bash scripts/setup.sh`: 40 steps) measures it, and this line then says how long a job takes.")
    return " ".join(lines)


MEMORY_FIELDS = ("teacher", "keep_first", "every", "keep_last", "keep", "batch_size", "seq_len", "processes", "fsdp",
                 "loss_chunk", "checkpointing")


def memory_line(services, teacher: str, keep_first, every, keep_last, keep, batch_size, seq_len, processes, fsdp,
                loss_chunk, checkpointing=False) -> str:
    """Peak memory per device of the form's job, from the teacher's config alone, and whether it fits this
    machine (its GPU, else its RAM); blank while the form does not make a valid job (the launch says why)."""
    source = (teacher or "default").strip()
    if not quick_to_load(source):  # the page's first paint must not wait on reading a GGUF file's header
        return ""
    try:
        check_sources(services, source)
        cfg = DistillConfig.from_dict({"teacher": source, **_plan_settings(keep_first, every, keep_last, keep),
                                       "batch_size": int(batch_size), "seq_len": int(seq_len),
                                       "processes": int(processes), "fsdp": bool(fsdp), "loss_chunk": int(loss_chunk or 0),
                                       "checkpointing": bool(checkpointing)})
        est = estimate_for(cfg)
    except (*USER_ERRORS, TypeError):
        return ""
    gib = 2**30
    p = est.parts
    parts = (f"teacher {p['teacher weights'] / gib:.2f}, student with gradients and AdamW "
             f"{(p['student weights'] + p['gradients'] + p['optimizer (AdamW)']) / gib:.2f}, activations "
             f"{p['activations'] / gib:.2f}, logits {p['logits'] / gib:.2f} GiB")
    where = f"this machine's {'GPU' if est.device.startswith('cuda') else 'RAM'}"
    verdict = (f"fits {where} ({est.available / gib:.1f} GiB)" if est.fits else
               f"**does not fit** {where} ({est.available / gib:.1f} GiB): " + "; ".join(est.advice)) \
        if est.available else ""
    return f"**Memory:** about {est.total / gib:.1f} GiB per device ({parts}); {verdict}."


def preview_on_load(services, teacher: str, keep_first, every, keep_last, keep, plan: str = "rule") -> tuple[str, list[list]]:
    """The preview the page shows when it opens, unless that would convert or download the teacher first
    (then the page says so and the button does it)."""
    source = (teacher or "default").strip()
    if not quick_to_load(source):
        return (f"Press **Preview the family** to see the plan and every size of `{source}` (it is loaded first: "
                f"converted or downloaded once).", [])
    return preview_plan(services, teacher, keep_first, every, keep_last, keep, plan)


def preview_plan(services, teacher: str, keep_first, every, keep_last, keep, plan: str = "rule") -> tuple[str, list[list]]:
    """What the student keeps and every size the family will have; an error message otherwise.

    With plan=importance the kept layers are measured when the job starts (on its first training blocks):
    the preview says so and shows the rule's plan as the size it will have, not as the layers it will keep."""
    check_text("the layer list", keep)
    check_sources(services, (teacher or "default").strip())
    cfg = DistillConfig(teacher=teacher or "default", plan=plan or "rule",
                        **_plan_settings(keep_first, every, keep_last, keep))
    t = services.models.teacher(cfg.teacher)
    plan = cfg.plan_for(t.n_layers)
    fam = Family(t.model, cut_student(t.model, plan, share=True), plan)
    sizes = fam.sizes()
    text = (f"Teacher **{t.source}**: {plan.n_teacher} layers, {sizes[-1].params:,} parameters. "
            f"The student keeps teacher layers `{list(plan.kept)}`: **{plan.n_student} layers, "
            f"{sizes[0].params:,} parameters**. The family has {len(sizes)} sizes.")
    if cfg.plan == "importance" and not cfg.keep:
        text = (f"Teacher **{t.source}**: {plan.n_teacher} layers, {sizes[-1].params:,} parameters. **Importance "
                f"plan:** the job keeps {plan.n_student} layers (about {sizes[0].params:,} parameters), chosen when it "
                f"starts as the layers whose loss costs the teacher most on its first training blocks; which ones, "
                f"and so which sizes the family has, is known then (the rule's plan below shows the size, not the "
                f"layers).")
    text += (" **Patch order:** at each size, whichever of last-k, first-k and the greedy orders (from the student up and from the teacher down) keeps it closest to the "
             "teacher, measured when the family is saved (`boomerang family --student DIR` shows each size's).")
    rows = [[s.n_layers, f"{s.params / 1e6:.1f}M", f"{s.params_no_embed / 1e6:.1f}M",
             "teacher" if s.is_teacher else "student" if s.is_student else patched_text(len(s.patched))]
            for s in sizes]
    return text, rows


LAUNCH_FIELDS = ("teacher", "keep_first", "every", "keep_last", "keep", "plan", "data", "steps", "batch_size", "seq_len",
                 "lr", "warmup", "ce_weight", "kl_weight", "cosine_weight", "mse_weight", "local_weight", "mix_prob",
                 "freeze_embeddings", "freeze_head", "freeze_single_blocks", "processes", "fsdp", "precision", "checkpointing", "loss_chunk", "evaluate")
"""The DistillConfig fields the launch form shows (the form is built from their types, defaults and docs)."""


def form_values(recipe: str) -> dict:
    """The launch form's values for a named recipe: every field it shows, as the recipe sets it."""
    cfg = DistillConfig.from_dict(named_recipe(recipe))
    values = {name: getattr(cfg, name) for name in LAUNCH_FIELDS}
    values["keep"] = ",".join(map(str, cfg.keep)) if cfg.keep else ""
    values["evaluate"] = True  # from the dashboard, a family is evaluated once saved unless unticked
    return values


def recipe_summary(recipe: str) -> str:
    """What the chosen recipe is, in one paragraph, with its values (not the paper's when it is another)."""
    cfg = DistillConfig.from_dict(named_recipe(recipe))
    terms = ", ".join(f"{name.removesuffix('_weight')} {getattr(cfg, name):g}" for name in cfg.loss_weights()
                      if getattr(cfg, name))
    head = {"paper": "Paper defaults (Kangaslahti et al., 2026)",
            "cpu": "The CPU recipe (docs/distillation.md, try 7)"}.get(recipe, f"Recipe {recipe}")
    frozen = [name.removeprefix("freeze_") for name in ("freeze_embeddings", "freeze_head", "freeze_single_blocks")
              if getattr(cfg, name)]
    return (f"**Settings** — {head}: AdamW lr {cfg.lr:g}, betas ({cfg.beta1:g}, {cfg.beta2:g}), wd {cfg.weight_decay:g}, "
            f"warm-up {cfg.warmup:.0%}, {cfg.schedule} schedule; loss terms {terms}; plan {cfg.plan}"
            + (f"; mixed sizes {cfg.mix_prob:.0%} of batches" if cfg.mix_prob else "")
            + (f"; frozen: {', '.join(frozen)}" if frozen else "") + ".")


def _form_settings(form: dict) -> dict:
    """Form values as DistillConfig settings: numbers typed by their fields, the keep list parsed, blanks dropped."""
    hints = typing.get_type_hints(DistillConfig)
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    out = {}
    for name, value in form.items():
        check_text(name, value)
        if name not in names or value is None or (isinstance(value, str) and not value.strip()):
            continue
        kind = hints[name]
        if name == "keep":
            value = parse_layer_list(str(value))
        elif kind is int:
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is bool:
            value = bool(value)
        elif isinstance(value, str):
            value = value.strip()
        out[name] = value
    return out


def launch_job(services, form: dict) -> str:
    """Queue a distillation from the launch form: `form` holds "recipe" and any DistillConfig fields by name.

    The recipe's settings come first, the form's values over them; the message says which job.
    """
    for name in ("teacher", "data"):
        check_text(name, form.get(name))
    check_sources(services, str(form.get("teacher") or "default").strip(), str(form.get("data") or "").strip())
    cfg = resolve_config(form.get("recipe") or "paper", _form_settings(form), named_only=True)
    job = submit(engine=services.engine, app=services.celery, kind="distill", settings=cfg.to_dict(),
                 queue=services.queue)
    return f"**Job {job.id} queued.** Follow it on the Jobs tab."


# ----------------------------------------------------------------------------- the tab

LABELS = {"keep_first": "Keep first", "every": "Every", "keep_last": "Keep last", "keep": "Or keep exactly these teacher layers",
          "plan": "Plan", "data": "Training data", "steps": "Steps", "batch_size": "Batch size",
          "seq_len": "Sequence length", "lr": "Learning rate", "warmup": "Warm-up", "ce_weight": "CE weight",
          "kl_weight": "KL weight", "cosine_weight": "Cosine weight", "mse_weight": "Norm (MSE) weight",
          "local_weight": "Blockwise weight", "mix_prob": "Mixed sizes", "freeze_embeddings": "Freeze embeddings",
          "freeze_head": "Freeze head", "freeze_single_blocks": "Freeze single-layer blocks", "processes": "Processes",
          "fsdp": "FSDP", "precision": "Precision", "evaluate": "Evaluate when done"}
ROWS = (("keep_first", "every", "keep_last"), ("keep", "plan"), ("data",), ("steps", "batch_size", "seq_len"),
        ("lr", "warmup", "mix_prob"), ("ce_weight", "kl_weight", "cosine_weight", "mse_weight", "local_weight"),
        ("freeze_embeddings", "freeze_head", "freeze_single_blocks"), ("processes", "fsdp", "precision", "checkpointing", "loss_chunk", "evaluate"))
"""The launch form's layout: rows of DistillConfig fields (every name in LAUNCH_FIELDS but the teacher)."""


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
    if name == "precision":
        return gr.Radio(list(PRECISIONS), value=value, **common)
    return gr.Textbox(value, **common)


def tab(services):
    """The launch form; returns the preview event (fn, inputs, outputs) the page runs when it loads."""
    docs, hints = field_docs(DistillConfig), typing.get_type_hints(DistillConfig)
    values = form_values("paper")
    fields = {}
    with gr.Row():
        with gr.Column(scale=3):
            fields["teacher"] = gr.Dropdown(teacher_choices(services), value="default", allow_custom_value=True,
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
            summary = gr.Markdown(recipe_summary("paper"), elem_id="recipe-summary")
            for row in ROWS[2:]:
                with gr.Row():
                    for name in row:
                        fields[name] = _field(name, values[name], hints[name], docs[name])
            estimate_md = gr.Markdown(elem_id="launch-estimate")
            memory_md = gr.Markdown(elem_id="launch-memory")
            launch_btn = gr.Button("Launch distillation", variant="primary", elem_id="launch-btn")
            launch_md = gr.Markdown(elem_id="launch-result")
    names = list(LAUNCH_FIELDS)
    assert set(names) == set(fields), "ROWS and LAUNCH_FIELDS must name the same fields"
    components = [fields[n] for n in names]
    plan_inputs = [fields[n] for n in ("teacher", "keep_first", "every", "keep_last", "keep")]
    preview_btn.click(bind(preview_plan, services, refused=PLAN_REFUSED, blank=([],)), [*plan_inputs, fields["plan"]], [preview_md, preview_table],
                      api_name="preview")

    recipe_fields = [n for n in names if n not in ("teacher", "evaluate")]  # evaluate: the user's, not a recipe's

    def pick_recipe(name):
        chosen = form_values(name)
        return recipe_summary(name), *[chosen[n] for n in recipe_fields]

    # the preview follows the recipe at once: the cpu recipe's importance plan is not the paper's rule plan
    recipe.change(safe(pick_recipe), recipe, [summary, *[fields[n] for n in recipe_fields]]).then(
        bind(preview_plan, services, refused=PLAN_REFUSED, blank=([],)), [*plan_inputs, fields["plan"]], [preview_md, preview_table], api_name=False)

    def launch(recipe_name, *form):
        return launch_job(services, {"recipe": recipe_name, **dict(zip(names, form, strict=False))})

    launch_btn.click(safe(reported(launch, "Not launched")), [recipe, *components], launch_md, api_name="launch")
    estimate_inputs = [fields[n] for n in ("teacher", "data", "steps", "batch_size", "seq_len", "mix_prob", "plan")]
    for name in ("teacher", "data", "steps", "batch_size", "seq_len", "mix_prob", "plan"):
        fields[name].change(bind(launch_estimate, services), estimate_inputs, estimate_md,
                            api_name=False, show_progress="hidden")

    memory_inputs = [fields[n] for n in MEMORY_FIELDS]
    for name in MEMORY_FIELDS:
        fields[name].change(bind(memory_line, services), memory_inputs, memory_md, api_name=False,
                            show_progress="hidden")

    def on_load(*values):
        n, m = len(plan_inputs) + 1, len(plan_inputs) + 1 + len(estimate_inputs)
        return (*reported(preview_on_load, PLAN_REFUSED, ([],))(services, *values[:n]),
                launch_estimate(services, *values[n:m]), memory_line(services, *values[m:]))

    return (safe(on_load), [*plan_inputs, fields["plan"], *estimate_inputs, *memory_inputs],
            [preview_md, preview_table, estimate_md, memory_md])
