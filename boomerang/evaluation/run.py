"""Evaluating a whole family, resumably: which models, which (model, task) cells, and the outputs.

Models: the family's sizes (series `teacher`, `student`, `interpolated`), optional baselines
(`undistilled`, `drop-bi`) at the same layer counts, and reference models. Tasks: lm-eval tasks
(local files or the registry), `heldout` (label-free metrics on the training text's held-out split),
`general` (the same on text of another domain) and `cost`.
Every finished cell is a file (see `results.py`); a cell already on disk for the same model is not
recomputed. A report (its table and charts) holds only the cells of its own request, so results of
other settings in the same folder never mix into it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from boomerang import data as d
from boomerang.arch import CausalLM
from boomerang.data import HELDOUT_FILE, SHIPPED_GENERAL
from boomerang.errors import BoomerangError
from boomerang.evaluation import chart, provenance, task_files
from boomerang.evaluation.chart import FAMILY_SERIES, LABEL_FREE, LABEL_FREE_METRICS
from boomerang.evaluation.metrics import (
    EvalSettings,
    label_free,
    label_free_many,
    lm_eval_task,
    measure_cost,
    metrics_of,
)
from boomerang.evaluation.results import ModelEntry, ResultStore, cell_key
from boomerang.evaluation.shared import SharedScorer, Stopped
from boomerang.family import Family, check_ends, compress_runs, count_params, resolve_order, schedule_of
from boomerang.importance import block_influence, drop_order, dropped_teacher
from boomerang.models import load_teacher
from boomerang.plan import parse_layer_list
from boomerang.settings import Settings
from boomerang.student import at_size_students, calibration_ids, cut_student, open_family, read_manifest, split_of

BASELINES = ("undistilled", "drop-bi")
CALIBRATION_TOKENS = 1024
"""Tokens the drop-bi baseline ranks layers on (a calibration split, never the evaluated blocks)."""
MAX_PARTS = 64
"""The most jobs one evaluation is shared out over."""
STANDARD_LIMIT = 100
"""Items per task of the evaluation a distillation asks for with `evaluate` (one standard error about 0.05)."""


@dataclass
class Candidate:
    entry: ModelEntry
    build: Callable[[], CausalLM]
    shared: bool = False
    """Built from the teacher's and the student's weights (a size, a baseline that drops layers): cheap to hold
    together, so their label-free cells are computed together (the teacher runs once per batch for all)."""


def family_candidates(family: Family, sizes: list[int] | None) -> list[Candidate]:
    out = []
    for n in sizes or family.layer_counts:
        info = family.info(n)
        series = "teacher" if info.is_teacher else "student" if info.is_student else "interpolated"
        blocks = compress_runs(info.layers)
        if series == "interpolated" and family.ends_for(info.patched) != ("student", "student"):
            embeddings, head = family.ends_for(info.patched)
            blocks += f" · embeddings: {embeddings}, norm and head: {head}"
        entry = ModelEntry(f"{series}-{n}", series, n, info.params, info.params_no_embed, blocks)
        out.append(Candidate(entry, functools.partial(family.build, n), shared=True))
    return out


def baseline_candidates(family: Family, names: list[str], sizes: list[int] | None, bi_ids: torch.Tensor | None) -> list[Candidate]:
    """Baselines at the family's layer counts below the teacher; `bi_ids` (B, T): the calibration text drop-bi
    ranks layers on."""
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise BoomerangError(f"unknown baselines {unknown}: choose from {', '.join(BASELINES)}")
    counts = [n for n in (sizes or family.layer_counts) if n < family.plan.n_teacher]
    out = []
    if "undistilled" in names:
        fresh = Family(family.teacher, cut_student(family.teacher, family.plan, share=True), family.plan,
                       order=family.schedule)
        for n in counts:
            info = fresh.info(n)
            entry = ModelEntry(f"undistilled-{n}", "undistilled", n, info.params, info.params_no_embed, compress_runs(info.layers))
            out.append(Candidate(entry, functools.partial(fresh.build, n), shared=True))
    if "drop-bi" in names:
        if bi_ids is None:
            raise BoomerangError("the drop-bi baseline needs calibration text to measure block influence on")
        order = drop_order(block_influence(family.teacher, bi_ids))
        n_t = family.plan.n_teacher
        for n in counts:
            drop = order[: n_t - n]
            kept = [i for i in range(n_t) if i not in set(drop)]
            model = dropped_teacher(family.teacher, drop)
            params, body = _shape_counts(family, model)
            entry = ModelEntry(f"drop-bi-{n}", "drop-bi", n, params, body, compress_runs([f"T{i}" for i in kept]))
            out.append(Candidate(entry, _given(model), shared=True))
    return out


def _shape_counts(family: Family, model) -> tuple[int, int]:
    """(parameters, parameters without embeddings and head) of a model shaped like the teacher's layers."""
    params = count_params([model])
    return params, params - count_params([m for p, m in family.arch.end_modules(model).items() if p[-1] != family.arch.norm])


def distilled_candidates(family: Family, folders: list[str], teacher) -> list[Candidate]:
    """Students distilled at one size of the family with its recipe, data and budget (`boomerang baselines`): the
    `distilled` series; with 1/K of its budget (`baselines --split`): the `split` series. Each is loaded when its
    cells are computed."""

    out = []
    for folder in folders:
        plan = read_manifest(folder).plan
        if plan.n_teacher != family.plan.n_teacher:
            raise BoomerangError(f"{folder} was cut from a {plan.n_teacher}-layer teacher, not this family's")
        shape = dropped_teacher(family.teacher, [i for i in range(plan.n_teacher) if i not in set(plan.kept)])
        params, body = _shape_counts(family, shape)
        n = plan.n_student
        k = split_of(folder)
        if k is None:
            entry = ModelEntry(f"distilled-{n}", "distilled", n, params, body,
                               compress_runs([f"T{i}" for i in plan.kept]) + " · distilled at this size")
        else:
            entry = ModelEntry(f"split{k}-{n}", "split", n, params, body, compress_runs([f"T{i}" for i in plan.kept])
                               + f" · distilled at this size with 1/{k} of the family's budget")
        out.append(Candidate(entry, functools.partial(_distilled_student, folder, teacher)))
    return out


def _given(model: CausalLM) -> Callable[[], CausalLM]:
    return lambda: model


def _distilled_student(folder: str, teacher) -> CausalLM:
    return open_family(folder, teacher=teacher).family.student


def family_variant(family: Family) -> dict:
    """What sets a family's sizes apart from the default ones (last-k order, student ends), for cell keys: {} for the
    default, else its order (or per-size schedule) and ends."""
    if family.schedule == schedule_of(family.plan, resolve_order(family.plan, "last")) and family.ends == "student":
        return {}
    if family.order is not None:
        return {"order": list(family.order), "ends": family.ends}
    return {"sizes": {str(n): list(p) for n, p in family.schedule.items()}, "ends": family.ends}


def reference_candidate(source: str, model: CausalLM) -> Candidate:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.rstrip("/").split("/")[-1]).strip("-").lower()
    params = count_params([model])
    embed = model.get_input_embeddings().weight.numel()  # type: ignore[operator]  # a module, typed loosely
    entry = ModelEntry(f"reference-{slug}", "reference", model.config.num_hidden_layers, params, params - embed, source)
    return Candidate(entry, lambda: model)


def parse_part(part: str) -> tuple[int, int]:
    """(I, N) of "I/N"; a BoomerangError unless 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(part))
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise BoomerangError(f"part must be I/N with 1 <= I <= N (e.g. 2/3), got {part!r}")
    return int(m[1]), int(m[2])


def share_out(candidates: list[Candidate], parts: int) -> list[list[str]]:
    """The models' keys shared out over `parts` jobs, each part about the same work, the same for every process that
    plans the same request.

    Models that are scored together stay together where they can, since together they share layer calls: the family's
    sizes are one group, the baselines another, every other model its own. A model's work is taken as its layer count.
    While there are fewer groups than parts, the heaviest group is halved (its smaller models in one half); then each
    group, heaviest first, goes to the lightest part. A part may be empty (more parts than models)."""

    def weight(group: list[Candidate]) -> int:
        return sum(c.entry.n_layers for c in group)

    family = [c for c in candidates if c.shared and c.entry.series in FAMILY_SERIES]
    baselines = [c for c in candidates if c.shared and c.entry.series not in FAMILY_SERIES]
    groups = [g for g in (family, baselines) if g] + [[c] for c in candidates if not c.shared]
    while len(groups) < parts:
        big = max(groups, key=weight)
        if len(big) < 2:
            break
        groups.remove(big)
        ordered = sorted(big, key=lambda c: c.entry.n_layers)
        cut, seen = len(ordered) - 1, 0
        for i, c in enumerate(ordered[:-1], start=1):
            seen += c.entry.n_layers
            if 2 * seen >= weight(ordered):
                cut = i
                break
        groups += [ordered[:cut], ordered[cut:]]
    keys: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for group in sorted(groups, key=weight, reverse=True):
        i = loads.index(min(loads))
        keys[i] += [c.entry.key for c in group]
        loads[i] += weight(group)
    return keys


@dataclass
class CellJob:
    """One (model, task) cell to compute."""

    candidate: Candidate
    task_name: str
    task: dict | str
    key: str


def plan_cells(candidates: list[Candidate], task_names: list[str], data_dir, settings: EvalSettings,
               texts: dict[str, torch.Tensor], cost: bool, variant: dict | None = None,
               dtype: str = "float32") -> list[CellJob]:
    """The cells to compute. `texts`: token blocks per label-free task (LABEL_FREE); `variant`: how the family's
    sizes were built when not the default (patch order, ends), part of every score's key; `dtype`: what the models
    run in, part of every key when not float32 (float32 keys are those of before dtypes were chosen)."""
    extra = {} if dtype == "float32" else {"dtype": dtype}
    specs = task_files.resolve(task_names, data_dir) if task_names else []
    # a cell's key: how it was measured, then "@" and the family's variant when not the default (cells of one
    # measurement compare across variants and families; see chart.measurement)
    suffix = "@" + hashlib.sha256(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:8] if variant else ""
    jobs = []
    for cand in candidates:
        for name, spec in zip(task_names, specs, strict=False):
            jobs.append(CellJob(cand, name, spec, cell_key(spec, {**asdict(settings), **extra}) + suffix))
        for name, blocks in texts.items():
            digest = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:12]
            key = {"heldout": digest} if name == "heldout" else {name: digest}
            jobs.append(CellJob(cand, name, name, cell_key(key, extra) + suffix))
        if cost:
            jobs.append(CellJob(cand, "cost", "cost", cell_key({"cost": 1, "threads": torch.get_num_threads(), **extra}, {})))
    return sorted(jobs, key=cell_phase)  # stable: within a phase, model by model as planned


def cell_phase(job: CellJob) -> int:
    """When a cell is computed: the cheap, telling ones first, so a chart can be drawn within minutes and fills in.
    The family's label-free cells (every size in a few passes over each text), its tasks, its cost; then the
    baselines' in the same order."""
    kind = 0 if job.task_name in LABEL_FREE else 2 if job.task_name == "cost" else 1
    return kind + (0 if job.candidate.entry.series in FAMILY_SERIES else 3)


def run_cells(jobs: list[CellJob], store: ResultStore, *, family: Family, tokenizer, settings: EvalSettings,
              texts: dict[str, torch.Tensor], on_cell=None, should_stop=None, on_rows=None, made: dict | None = None) -> int:
    """Compute every cell not on disk yet; returns how many were computed. `on_rows(rows)` hears each cell's rows
    (`ResultStore.rows`) as it lands or is found on disk: a chart can show them before the whole evaluation ends.
    `made` (`provenance.base`): how the numbers were made, kept in every cell computed.

    Cost depends on a model's shape alone (layers, widths, dtype, device), not on its weights: a baseline
    with the same layer count and parameters as a size measured in this run takes that size's cost cell
    (marked `same_shape_as`) instead of timing the same computation again."""
    computed = 0
    built: dict = {}
    costs: dict = {}
    together: dict = {}
    scorers: dict[str, SharedScorer] = {}
    for done, job in enumerate(jobs, start=1):
        entry = job.candidate.entry
        shape = (entry.n_layers, entry.params)
        if _missing(store, job):
            if job.task_name in LABEL_FREE and job.candidate.shared:
                if (entry.key, job.task_name) not in together:
                    together.update(_label_free_together(jobs[done - 1:], job.task_name, store, family, texts, settings))
                result = together.pop((entry.key, job.task_name))
            elif job.task_name == "cost" and shape in costs:
                source, measured = costs[shape]
                result = {**measured, "same_shape_as": source}
            elif job.task_name not in (*LABEL_FREE, "cost") and job.candidate.shared:
                scorer = _scorer_for(jobs[done - 1:], scorers, store, settings, should_stop)
                try:
                    result = _task_cell(job, scorer.models[entry.key], tokenizer, settings, scorer)
                except Stopped:  # asked to stop while the group was scored: nothing of it is kept
                    break
            else:
                model = built.get(entry.key) or job.candidate.build()
                built = {entry.key: model}  # hold one model at a time
                result = _compute(job, model, family, tokenizer, settings, texts)
                if job.task_name == "cost":
                    costs[shape] = (entry.key, result)
            if made is not None:
                result = {**result, "provenance": provenance.of_cell(made, job.task, result, asdict(settings))}
            store.put(entry, job.task_name, job.key, result)
            computed += 1
            skipped = False
        else:
            skipped = True
        if on_rows:
            on_rows(store.rows(cells=[store.path(entry.key, job.task_name, job.key)]))
        if on_cell:
            on_cell(done, len(jobs), entry.key, job.task_name, skipped)
        if should_stop and should_stop():
            break
    return computed


def _missing(store: ResultStore, job: CellJob) -> bool:
    """Whether a cell is to be computed: none on disk for this model, or an lm-eval cell measured before each
    scored item was kept (measured again once, to the same numbers, so the items can be compared)."""
    cell = store.get(job.candidate.entry.key, job.task_name, job.key, model=job.candidate.entry)
    return cell is None or (job.task_name not in (*LABEL_FREE, "cost") and "items" not in cell)


def _scorer_for(jobs: list[CellJob], scorers: dict, store: ResultStore, settings: EvalSettings,
                should_stop=None) -> SharedScorer:
    """The scorer of the group `jobs[0]`'s model is scored with on its task: the shared-weight models of the same phase
    (the family, or the baselines) whose cell of that task is still to compute. The first of them to ask has the
    whole group scored (see `shared`); the others' cells then take seconds."""
    job = jobs[0]
    scorer = scorers.get(job.task_name)
    if scorer is None or job.candidate.entry.key not in scorer.models:
        pending = [j for j in jobs if j.task_name == job.task_name and j.candidate.shared
                   and cell_phase(j) == cell_phase(job) and _missing(store, j)]
        scorer = scorers[job.task_name] = SharedScorer({j.candidate.entry.key: j.candidate.build() for j in pending},
                                                        batch_size=settings.batch_size, should_stop=should_stop)
    return scorer


LABEL_FREE_TOGETHER = 8
"""Shared-weight models whose label-free cells are computed in one pass over a text: the teacher then runs once
per batch for 8 models instead of 8 times, and progress still moves every few cells."""


def _label_free_together(jobs: list[CellJob], task: str, store: ResultStore, family: Family, texts,
                         settings: EvalSettings) -> dict:
    """The label-free cells of `task` not on disk for the next LABEL_FREE_TOGETHER shared-weight models of
    `jobs`, computed in one pass over the text: {(model key, task): cell}."""
    pending = [j for j in jobs if j.task_name == task and j.candidate.shared
               and store.get(j.candidate.entry.key, task, j.key, model=j.candidate.entry) is None][:LABEL_FREE_TOGETHER]
    models = {j.candidate.entry.key: j.candidate.build() for j in pending}
    results = label_free_many(models, family.teacher, texts[task], batch_size=settings.batch_size,
                              n_layers={j.candidate.entry.key: j.candidate.entry.n_layers for j in pending})
    return {(key, task): _label_free_cell(task, r) for key, r in results.items()}


def _label_free_cell(task: str, r) -> dict:
    return {"task": task, "metrics": {"perplexity": (r.perplexity, None), "kl_to_teacher": (r.kl_to_teacher, r.kl_stderr),
                                      "top1_agreement": (r.top1_agreement, r.top1_stderr)}, "tokens": r.tokens}


def _compute(job: CellJob, model, family: Family, tokenizer, settings: EvalSettings, texts) -> dict:
    with torch.no_grad():
        if job.task_name in LABEL_FREE:
            r = label_free(model, family.teacher, texts[job.task_name], batch_size=settings.batch_size,
                           n_layers=job.candidate.entry.n_layers)
            return _label_free_cell(job.task_name, r)
        if job.task_name == "cost":
            return {"task": "cost", **measure_cost(model)}
    return _task_cell(job, model, tokenizer, settings)


def _task_cell(job: CellJob, model, tokenizer, settings: EvalSettings, scorer: SharedScorer | None = None) -> dict:
    result = lm_eval_task(model, tokenizer, job.task, settings, scorer=scorer, key=job.candidate.entry.key)
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
    order: str = "best"
    """Patch order: best (the best measured per size: the default, measured once if the manifest lacks it) | last |
    first | greedy | reverse | a comma-separated list of student layers."""
    ends: str = "student"
    """Whose embeddings and final norm + head the sizes between student and teacher use: student | teacher |
    auto (the paper's reference code: teacher ends on the patched side)."""
    sizes: str = "all"
    """all | comma-separated layer counts."""
    baselines: list[str] = field(default_factory=list)
    """Baselines at every size: undistilled (the teacher with layers dropped) and drop-bi (layers ranked by block
    influence dropped); any of BASELINES."""
    references: list[str] = field(default_factory=list)
    """Reference models (hub ids or folders)."""
    distilled: list[str] = field(default_factory=list)
    """Students distilled at one size of the family with its recipe, data and budget (`boomerang baselines`; the
    standard evaluation takes every finished one of the run)."""
    heldout_data: str | None = None
    """Text file for label-free metrics (its last 10%), or a student's heldout-tokens.pt (all of it)."""
    heldout_tokens: int = d.HELDOUT_EVALUATED
    """Held-out tokens measured (on each held-out text)."""
    general_data: str | None = None
    """Text of another domain for the same metrics (all of it held out): a file, or "shipped" (an excerpt of
    WikiText-2 test that ships with the package; the standard evaluation's choice)."""
    calibration: str | None = None
    """Text the drop-bi baseline ranks layers on when the held-out text has no blocks beyond the evaluated
    ones (default: a built-in text); also the greedy order's."""
    cost: bool = False
    """Also measure memory, prefill latency and decode speed."""
    settings: EvalSettings = field(default_factory=EvalSettings)
    """lm-eval settings (few-shot, limit, batch size, seed)."""
    out: str | None = None
    """Results folder (default: STUDENT/eval)."""
    chart_metric: str = "acc"
    """Metric of the charts."""
    device: str = "cpu"
    """cpu, cuda, cuda:1, ..."""
    dtype: str = "auto"
    """auto (bfloat16 where this machine does it natively and faster, else float32; see boomerang.precision) | float32 |
    bfloat16 | float16. Part of every cell's key when not float32: numbers measured in other dtypes are not mixed."""
    parts: int = 1
    """A queued evaluation shared out over this many jobs, one per free worker (`share_out`): the job asked for queues
    the others, computes its own part and any part no worker took, then measures cost alone and writes the report
    (docs/scale-out.md). `boomerang eval` runs in one process: there, run each `--part` then once without."""
    part: str | None = None
    """I/N: only the cells of the I-th of N parts (`share_out`), without cost cells and without the report: what each job
    of a shared-out evaluation computes. The same request without `part` then finds them on disk and gathers them."""

    def __post_init__(self):
        self.check_types()
        if not 1 <= self.parts <= MAX_PARTS:
            raise BoomerangError(f"parts must be between 1 and {MAX_PARTS}, got {self.parts}")
        if self.part is not None:
            parse_part(self.part)
            if self.parts > 1:
                raise BoomerangError("give parts (share out a queued evaluation) or part (compute one of its parts), "
                                     "not both")
        self.tasks, self.baselines, self.references = list(self.tasks), list(self.baselines), list(self.references)
        self.distilled = [str(Path(f).expanduser().resolve()) for f in self.distilled]
        self.student = str(Path(self.student).expanduser().resolve())
        check_ends(self.ends)
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise BoomerangError(f"unknown baselines {unknown}: choose from {', '.join(BASELINES)}")
        if self.sizes != "all":
            parse_layer_list(self.sizes)
        if self.heldout_tokens < 2:
            raise BoomerangError(f"heldout_tokens must be at least 2, got {self.heldout_tokens}")
        if not (self.tasks or self.heldout_data or self.general_data or self.cost):
            raise BoomerangError("nothing to evaluate: give tasks, held-out data or cost")

    @classmethod
    def standard(cls, student: str, **fields) -> EvalRequest:
        """The evaluation asked for by naming nothing, and what a new user gets, offline: the shipped
        multiple-choice tasks, label-free metrics on the distillation's own held-out text (when the student
        folder keeps it) and on the shipped general text, cost, both baselines, and the students distilled at sizes
        of the family (`boomerang baselines`) that have finished; `fields` override any of it."""

        held = Path(student).expanduser() / HELDOUT_FILE
        base = {"tasks": task_files.shipped_tasks(), "cost": True, "baselines": list(BASELINES),
                "general_data": SHIPPED_GENERAL, "distilled": [str(p) for p in at_size_students(student)]}
        if held.is_file():
            base.update(heldout_data=str(held))
        return cls(student=student, **{**base, **fields})

    @classmethod
    def asked(cls, student: str, **fields) -> EvalRequest:
        """What a command line or form asks for: naming none of what to measure (tasks, baselines, held-out or
        general text, cost) is the standard evaluation with the other `fields`; naming any is exactly that. The
        students distilled at sizes of the family are taken unless `distilled` is given."""

        measured = ("tasks", "baselines", "heldout_data", "general_data", "cost")
        if not any(fields.get(name) for name in measured):
            return cls.standard(student, **fields)
        return cls(student=student, **{"distilled": [str(p) for p in at_size_students(student)], **fields})

    @classmethod
    def after_distillation(cls, student: str, **fields) -> EvalRequest:
        """What `DistillConfig.evaluate` asks for once the family is saved: the standard evaluation at
        STANDARD_LIMIT items per task (`boomerang distill` runs it, a worker queues it)."""

        return cls.standard(student, **{"settings": EvalSettings(limit=STANDARD_LIMIT), **fields})

    def check(self) -> None:
        """Checks against the world, before any work: the student's manifest, the tasks, the held-out file."""

        read_manifest(self.student)
        for folder in self.distilled:
            read_manifest(folder)
        if self.tasks:
            task_files.resolve(self.tasks, self.data_dir)

        if self.heldout_data and not Path(self.heldout_data).expanduser().exists():
            raise BoomerangError(f"held-out data not found: {self.heldout_data}")
        if self.general_data and self.general_data != SHIPPED_GENERAL and not Path(self.general_data).expanduser().exists():
            raise BoomerangError(f"general text not found: {self.general_data} (or use 'shipped')")
        if self.calibration and not Path(self.calibration).expanduser().is_file():
            raise BoomerangError(f"calibration text not found: {self.calibration}")


@dataclass
class EvalReport:
    computed: int
    total: int
    table: object
    """The family table's path; None for one part of a shared-out evaluation (the gathering job writes it)."""
    charts: list
    rows: list


def evaluate_student(req: EvalRequest, *, on_cell=None, should_stop=None, teacher=None, on_rows=None) -> EvalReport:
    """Evaluate a student's family (and baselines, references) as `req` says; resumable. `on_cell` hears
    progress, `on_rows` each cell's rows as it lands (see `run_cells`)."""

    opened = open_family(req.student, teacher=teacher or req.teacher, order=req.order, device=req.device,
                         dtype=req.dtype, ends=req.ends, calibration=req.calibration)
    teacher, family = opened.teacher, opened.family
    sizes = None if req.sizes == "all" else parse_layer_list(req.sizes)
    for n in sizes or []:
        family.info(n)  # a size the family lacks fails before any work
    texts, calibration = {}, None
    if req.heldout_data:
        texts["heldout"], calibration = d.heldout_split(req.heldout_data, teacher.tokenizer, req.heldout_tokens,
                                                        CALIBRATION_TOKENS)
    if req.general_data:
        texts["general"] = d.general_blocks(req.general_data, teacher.tokenizer, req.heldout_tokens)
    if "drop-bi" in req.baselines and (calibration is None or calibration.shape[0] == 0):
        calibration = calibration_ids(teacher.tokenizer, req.calibration, CALIBRATION_TOKENS)
    candidates = family_candidates(family, sizes) + baseline_candidates(
        family, req.baselines, sizes, None if calibration is None else calibration.to(teacher.device))
    candidates += distilled_candidates(family, req.distilled, teacher)
    dtype = str(next(teacher.model.parameters()).dtype).removeprefix("torch.")
    for ref in req.references:
        candidates.append(reference_candidate(ref, load_teacher(ref, device=req.device, dtype=dtype).model))
    variant = family_variant(family)
    jobs = plan_cells(candidates, req.tasks, req.data_dir, req.settings, texts, req.cost, variant, dtype)
    if not jobs:
        raise BoomerangError("nothing to evaluate: give tasks, held-out data or cost")
    if req.part:  # one part of a shared-out evaluation: its models' cells; cost is timed by the gathering job, alone
        i, n = parse_part(req.part)
        mine = set(share_out(candidates, n)[i - 1])
        jobs = [j for j in jobs if j.candidate.entry.key in mine and j.task_name != "cost"]
    store = ResultStore(req.out or Path(req.student) / "eval")
    summary = read_manifest(req.student).distilled or {}
    made = provenance.base(teacher.model, summary.get("recipe"))
    computed = run_cells(jobs, store, family=family, tokenizer=teacher.tokenizer, settings=req.settings,
                         texts=texts, on_cell=on_cell, should_stop=should_stop, on_rows=on_rows, made=made)
    rows = store.rows(cells=[store.path(j.candidate.entry.key, j.task_name, j.key) for j in jobs])
    if req.part:
        return EvalReport(computed, len(jobs), None, [], rows)
    charts: list[Path] = []
    for task in [*req.tasks, *(["average"] if len(req.tasks) > 1 else [])]:
        pts = chart.points(rows, task, req.chart_metric)
        if pts:
            charts += chart.save(pts, task, req.chart_metric, store.root / "charts")
    for name in texts:  # how good on each text, and how much of the teacher each size keeps
        for metric in LABEL_FREE_METRICS:
            charts += chart.save(chart.points(rows, name, metric), name, metric, store.root / "charts")
    return EvalReport(computed, len(jobs), store.write_table(rows=rows), charts, rows)
