"""Evaluating a whole family, resumably: which models, which (model, task) cells, and the outputs.

Models: the family's sizes (series `teacher`, `student`, `interpolated`), optional baselines
(`undistilled`, `drop-bi`) at the same layer counts, and reference models. Tasks: lm-eval tasks
(local files or the registry), `heldout` (label-free metrics on held-out text) and `cost`.
Every finished cell is a file (see `results.py`); a cell already on disk is not recomputed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from boomerang.errors import BoomerangError
from boomerang.evaluation import task_files
from boomerang.evaluation.metrics import EvalSettings, label_free, lm_eval_task, measure_cost, metrics_of
from boomerang.evaluation.results import ModelEntry, ResultStore, cell_key
from boomerang.family import Family, compress_runs, count_params
from boomerang.importance import block_influence, drop_order, dropped_teacher
from boomerang.settings import Settings
from boomerang.student import cut_student

BASELINES = ("undistilled", "drop-bi")
STANDARD_LIMIT = 100
"""Items per task of the evaluation a distillation asks for with `evaluate` (one standard error about 0.05)."""


@dataclass
class Candidate:
    entry: ModelEntry
    build: Callable[[], torch.nn.Module]


def family_candidates(family: Family, sizes: list[int] | None) -> list[Candidate]:
    out = []
    for n in sizes or family.layer_counts:
        info = family.info(n)
        series = "teacher" if info.is_teacher else "student" if info.is_student else "interpolated"
        entry = ModelEntry(f"{series}-{n}", series, n, info.params, info.params_no_embed, compress_runs(info.layers))
        out.append(Candidate(entry, lambda n=n: family.build(n)))
    return out


def baseline_candidates(family: Family, names: list[str], sizes: list[int] | None, bi_ids: torch.Tensor | None) -> list[Candidate]:
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise BoomerangError(f"unknown baselines {unknown}: choose from {', '.join(BASELINES)}")
    counts = [n for n in (sizes or family.layer_counts) if n < family.plan.n_teacher]
    out = []
    if "undistilled" in names:
        fresh = Family(family.teacher, cut_student(family.teacher, family.plan, share=True), family.plan,
                       order=family.order)
        for n in counts:
            info = fresh.info(n)
            entry = ModelEntry(f"undistilled-{n}", "undistilled", n, info.params, info.params_no_embed, compress_runs(info.layers))
            out.append(Candidate(entry, lambda n=n: fresh.build(n)))
    if "drop-bi" in names:
        if bi_ids is None:
            raise BoomerangError("the drop-bi baseline needs text to measure block influence on: give --heldout-data")
        order = drop_order(block_influence(family.teacher, bi_ids))
        n_t = family.plan.n_teacher
        for n in counts:
            drop = order[: n_t - n]
            kept = [i for i in range(n_t) if i not in set(drop)]
            model = dropped_teacher(family.teacher, drop)
            params = count_params([model])
            body = params - count_params([m for p, m in family.arch.end_modules(model).items() if p[-1] != family.arch.norm])
            entry = ModelEntry(f"drop-bi-{n}", "drop-bi", n, params, body, compress_runs([f"T{i}" for i in kept]))
            out.append(Candidate(entry, lambda model=model: model))
    return out


def reference_candidate(source: str, model: torch.nn.Module) -> Candidate:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.rstrip("/").split("/")[-1]).strip("-").lower()
    params = count_params([model])
    embed = model.get_input_embeddings().weight.numel()
    entry = ModelEntry(f"reference-{slug}", "reference", model.config.num_hidden_layers, params, params - embed, source)
    return Candidate(entry, lambda: model)


@dataclass
class CellJob:
    """One (model, task) cell to compute."""

    candidate: Candidate
    task_name: str
    task: dict | str
    key: str


def plan_cells(candidates: list[Candidate], task_names: list[str], data_dir, settings: EvalSettings,
               heldout: torch.Tensor | None, cost: bool) -> list[CellJob]:
    specs = task_files.resolve(task_names, data_dir) if task_names else []
    jobs = []
    for cand in candidates:
        for name, spec in zip(task_names, specs):
            jobs.append(CellJob(cand, name, spec, cell_key(spec, asdict(settings))))
        if heldout is not None:
            digest = hashlib.sha256(heldout.numpy().tobytes()).hexdigest()[:12]
            jobs.append(CellJob(cand, "heldout", "heldout", cell_key({"heldout": digest}, {})))
        if cost:
            jobs.append(CellJob(cand, "cost", "cost", cell_key({"cost": 1, "threads": torch.get_num_threads()}, {})))
    return jobs


def run_cells(jobs: list[CellJob], store: ResultStore, *, family: Family, tokenizer, settings: EvalSettings,
              heldout: torch.Tensor | None, on_cell=None, should_stop=None) -> int:
    """Compute every cell not on disk yet; returns how many were computed.

    Cost depends on a model's shape alone (layers, widths, dtype, device), not on its weights: a baseline
    with the same layer count and parameters as a size measured in this run takes that size's cost cell
    (marked `same_shape_as`) instead of timing the same computation again."""
    computed, built, costs = 0, {}, {}
    for done, job in enumerate(jobs, start=1):
        entry = job.candidate.entry
        shape = (entry.n_layers, entry.params)
        if store.get(entry.key, job.task_name, job.key) is None:
            if job.task_name == "cost" and shape in costs:
                source, result = costs[shape]
                store.put(entry, job.task_name, job.key, {**result, "same_shape_as": source})
            else:
                model = built.get(entry.key) or job.candidate.build()
                built = {entry.key: model}  # hold one model at a time
                result = _compute(job, model, family, tokenizer, settings, heldout)
                store.put(entry, job.task_name, job.key, result)
                if job.task_name == "cost":
                    costs[shape] = (entry.key, result)
            computed += 1
            skipped = False
        else:
            skipped = True
        if on_cell:
            on_cell(done, len(jobs), entry.key, job.task_name, skipped)
        if should_stop and should_stop():
            break
    return computed


def _compute(job: CellJob, model, family: Family, tokenizer, settings: EvalSettings, heldout) -> dict:
    with torch.no_grad():
        if job.task_name == "heldout":
            r = label_free(model, family.teacher, heldout, batch_size=settings.batch_size, n_layers=job.candidate.entry.n_layers)
            return {"task": "heldout", "metrics": {"perplexity": (r.perplexity, None), "kl_to_teacher": (r.kl_to_teacher, r.kl_stderr),
                                                  "top1_agreement": (r.top1_agreement, r.top1_stderr)}, "tokens": r.tokens}
        if job.task_name == "cost":
            return {"task": "cost", **measure_cost(model)}
    result = lm_eval_task(model, tokenizer, job.task, settings)
    return {**result, "metrics": metrics_of(result)}


# ----------------------------------------------------------------------------- one call for CLI and worker


@dataclass
class EvalRequest(Settings):
    """Everything an evaluation of a student's family needs; the CLI, a queued job and the dashboard build one."""

    student: str
    """Student folder."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names: file stems in `data_dir`, shipped tasks (`task_files.shipped_tasks()`), or registry names."""
    data_dir: str | None = None
    """Folder of local evaluation files."""
    teacher: str | None = None
    """Teacher source (default: the student's own)."""
    order: str = "last"
    """Patch order: last | first | greedy (once in the manifest) | a comma-separated list of student layers."""
    sizes: str = "all"
    """all | comma-separated layer counts."""
    baselines: list[str] = field(default_factory=list)
    """Any of BASELINES."""
    references: list[str] = field(default_factory=list)
    """Reference models (hub ids or folders)."""
    heldout_data: str | None = None
    """Text file for label-free metrics (its last 10%), or a student's heldout-tokens.pt (all of it)."""
    heldout_tokens: int = 4096
    """Held-out tokens measured."""
    cost: bool = False
    """Also measure memory, prefill latency and decode speed."""
    settings: EvalSettings = field(default_factory=EvalSettings)
    """lm-eval settings (few-shot, limit, batch size, seed)."""
    out: str | None = None
    """Results folder (default: STUDENT/eval)."""
    chart_metric: str = "acc"
    """Metric of the charts."""
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        from boomerang.plan import parse_layer_list

        self.check_types()
        self.tasks, self.baselines, self.references = list(self.tasks), list(self.baselines), list(self.references)
        self.student = str(Path(self.student).expanduser().resolve())
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise BoomerangError(f"unknown baselines {unknown}: choose from {', '.join(BASELINES)}")
        if self.sizes != "all":
            parse_layer_list(self.sizes)
        if self.heldout_tokens < 2:
            raise BoomerangError(f"heldout_tokens must be at least 2, got {self.heldout_tokens}")
        if not (self.tasks or self.heldout_data or self.cost):
            raise BoomerangError("nothing to evaluate: give tasks, held-out data or cost")
        if "drop-bi" in self.baselines and not self.heldout_data:
            raise BoomerangError("the drop-bi baseline needs text to measure block influence on: give --heldout-data")

    @classmethod
    def standard(cls, student: str, **fields) -> EvalRequest:
        """The evaluation asked for by naming nothing, and what a new user gets, offline: the shipped
        multiple-choice tasks, label-free metrics on the distillation's own held-out text (when the student
        folder keeps it), cost, and both baselines (drop-bi needs that text); `fields` override any of it."""
        from boomerang.data import HELDOUT_FILE

        held = Path(student).expanduser() / HELDOUT_FILE
        base = {"tasks": task_files.shipped_tasks(), "cost": True}
        if held.is_file():
            base.update(heldout_data=str(held), baselines=list(BASELINES))
        else:
            base.update(baselines=["undistilled"])
        return cls(student=student, **{**base, **fields})

    @classmethod
    def after_distillation(cls, student: str, **fields) -> EvalRequest:
        """What `DistillConfig.evaluate` asks for once the family is saved: the standard evaluation at
        STANDARD_LIMIT items per task (`boomerang distill` runs it, a worker queues it)."""
        from boomerang.evaluation.metrics import EvalSettings

        return cls.standard(student, **{"settings": EvalSettings(limit=STANDARD_LIMIT), **fields})

    def check(self) -> None:
        """Checks against the world, before any work: the student's manifest, the tasks, the held-out file."""
        from boomerang.student import read_manifest

        read_manifest(self.student)
        if self.tasks:
            task_files.resolve(self.tasks, self.data_dir)
        if self.heldout_data and not Path(self.heldout_data).expanduser().exists():
            raise BoomerangError(f"held-out data not found: {self.heldout_data}")


@dataclass
class EvalReport:
    computed: int
    total: int
    table: object
    charts: list
    rows: list


def evaluate_student(req: EvalRequest, *, on_cell=None, should_stop=None, teacher=None) -> EvalReport:
    """Evaluate a student's family (and baselines, references) as `req` says; resumable."""
    from boomerang import data as d
    from boomerang.evaluation import chart
    from boomerang.models import load_teacher
    from boomerang.plan import parse_layer_list
    from boomerang.student import open_family

    opened = open_family(req.student, teacher=teacher or req.teacher, order=req.order, device=req.device,
                         dtype=req.dtype)
    teacher, family = opened.teacher, opened.family
    sizes = None if req.sizes == "all" else parse_layer_list(req.sizes)
    for n in sizes or []:
        family.info(n)  # a size the family lacks fails before any work
    heldout = None
    if req.heldout_data:
        heldout = d.heldout_blocks(req.heldout_data, teacher.tokenizer, req.heldout_tokens)
    candidates = family_candidates(family, sizes) + baseline_candidates(family, req.baselines, sizes, heldout)
    for ref in req.references:
        candidates.append(reference_candidate(ref, load_teacher(ref, device=req.device).model))
    jobs = plan_cells(candidates, req.tasks, req.data_dir, req.settings, heldout, req.cost)
    if not jobs:
        raise BoomerangError("nothing to evaluate: give tasks, held-out data or cost")
    store = ResultStore(req.out or Path(req.student) / "eval")
    computed = run_cells(jobs, store, family=family, tokenizer=teacher.tokenizer, settings=req.settings,
                         heldout=heldout, on_cell=on_cell, should_stop=should_stop)
    rows = store.rows()
    charts = []
    for task in [*req.tasks, *(["average"] if len(req.tasks) > 1 else [])]:
        pts = chart.points(rows, task, req.chart_metric)
        if pts:
            charts += chart.save(pts, task, req.chart_metric, store.root / "charts")
    if heldout is not None:  # how good on the text, and how much of the teacher each size keeps
        for metric in ("perplexity", "kl_to_teacher", "top1_agreement"):
            charts += chart.save(chart.points(rows, "heldout", metric), "heldout", metric, store.root / "charts")
    return EvalReport(computed, len(jobs), store.write_table(), charts, rows)
