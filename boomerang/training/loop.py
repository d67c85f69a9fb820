"""The training half of the method: distill a cut student toward its teacher, resumably.

`distill(cfg, on_step=..., should_stop=...)` reads `setup -> run -> finish`. The library reports
(every step goes to the callback and to `metrics.jsonl`, its loss terms by name) and the caller
decides (the stop flag is checked after every optimizer step; stopping saves a checkpoint).

Loss terms are the rows of `training.terms.TERMS`; a step computes the active ones (`loss_step`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from boomerang import data as d
from boomerang.arch import CausalLM, adapter_for
from boomerang.errors import BoomerangError
from boomerang.family import Family
from boomerang.models import Teacher, boomerang_home, load_teacher
from boomerang.plan import LayerPlan
from boomerang.progress import Phase, Phases
from boomerang.student import Manifest, cut_student, measure_best, read_manifest, save_student
from boomerang.training import parallel, timing
from boomerang.training.checkpoint import (
    CHECKPOINT,
    METRICS,
    PLAN,
    RECIPE,
    STUDENT,
    load_checkpoint,
    read_plan,
    save_checkpoint,
)
from boomerang.training.memory import check_fits
from boomerang.training.recipe import DistillConfig, read_recipe, recipe_changes
from boomerang.training.terms import LossInputs, active_terms, attach_capture, mixed_size, needs_of

IMPORTANCE_BLOCKS = 8
"""Training blocks the importance plan is measured on (the first batch of the run's own order)."""
CHECKPOINT_MAX_AGE_S = 300.0
"""A checkpoint is also written when the last one (or the start) is this old: a crash costs minutes, not hours."""


@dataclass
class StepReport:
    """What the callback gets after every optimizer step (and one line of `metrics.jsonl`)."""

    step: int
    total: int
    loss: float
    """The weighted sum of the terms."""
    terms: dict[str, float]
    """Each active loss term, unweighted, by name (see TERMS)."""
    lr: float
    grad_norm: float
    tokens: int
    """Tokens seen so far in the run."""
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    checkpoint: bool = False
    """A checkpoint holding this step is written right after this report."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepReport":
        return cls(**data)


@dataclass
class DistillResult:
    out: Path
    steps_done: int
    stopped: bool
    student_dir: Path | None
    last: StepReport | None = None


@dataclass
class Run:
    """A run in progress: what `setup` made and the loop, checkpoints and `finish` use."""

    cfg: DistillConfig
    out: Path
    teacher: Teacher
    student: CausalLM
    plan: LayerPlan
    data: d.TokenData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    """The run's one device: teacher, student and every batch are on it."""
    start_step: int = 0
    sharded: bool = False
    """True when the teacher and student are sharded with FSDP over several processes."""
    family: Family | None = None
    """The family of teacher and student (for mix_prob: random sizes trained in place of the student)."""
    captured: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    """Hook handles on the teacher and student; removed when the run ends (the teacher may be reused)."""


# ----------------------------------------------------------------------------- setup


def setup(cfg: DistillConfig, *, resume: bool = False, teacher: Teacher | None = None, on_phase=None) -> Run:
    """Everything a run needs, on the run's one device. A `teacher` given is moved there (it is frozen).

    `on_phase(Phase)` hears the phases before training: loading the teacher, writing its corpus, measuring
    layer importance."""
    parallel.check_world(cfg)
    device = parallel.run_device(cfg)
    parallel.init_distributed(device)
    rank, world = parallel.world()
    sharded = cfg.fsdp and world > 1
    out = Path(cfg.out).expanduser().resolve()
    created = not out.exists()
    try:
        run = _setup(cfg, out, resume, teacher, device, sharded, Phases(on_phase))
    except BaseException:
        if created and rank == 0:  # a run that never started leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    parallel.barrier()
    return run


def _setup(cfg: DistillConfig, out: Path, resume: bool, teacher: Teacher | None, device: torch.device,
           sharded: bool, phases: Phases) -> Run:
    rank, world = parallel.world()
    from_checkpoint = _prepare_out(cfg, out, resume) if rank == 0 else resume and (out / CHECKPOINT).is_file()
    parallel.barrier()
    check_fits(cfg)  # a run that cannot fit is refused with the numbers before any weight is read
    if cfg.optimizer == "adamw8bit":
        eight_bit_adamw(device)  # likewise a run whose optimizer cannot run here
    with phases.run("loading the teacher", 1, "models") as step:
        if sharded:  # each process reads the teacher on the host and keeps only its shards on the device
            teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device="cpu")
        elif teacher is None:
            teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device=str(device))
        elif teacher.device != device:
            teacher.to(device)
        step()
    data = load_data(cfg, teacher, phases)
    if from_checkpoint and (out / PLAN).is_file():  # the plan the run started with, however it was chosen
        plan = read_plan(out)
    else:
        plan = cfg.resolve_plan(teacher.model, data.batch(0, IMPORTANCE_BLOCKS, cfg.seed).to(teacher.device), phases)

    student = cut_student(teacher.model, plan).train().requires_grad_(True)
    _freeze(student, cfg, plan)
    if cfg.checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sharded:
        parallel.shard(teacher.model, device, world)
        parallel.shard(student, device, world)
    else:
        student.to(device)
    optimizer = make_optimizer(student, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    run = Run(cfg, out, teacher, student, plan, data, optimizer, scheduler, device, sharded=sharded)
    if cfg.mix_prob:
        run.family = Family(teacher.model, student, plan, order="last")
    attach_capture(run)
    if from_checkpoint:
        load_checkpoint(run)
    elif rank == 0:
        (out / RECIPE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / PLAN).write_text(json.dumps(plan.to_dict()) + "\n")
        (out / METRICS).write_text("")

    if rank == 0 and not (out / d.HELDOUT_FILE).is_file():  # a checkpoint's snapshot is evaluated on it too
        d.save_heldout(data.heldout, out)
    return run


def _prepare_out(cfg: DistillConfig, out: Path, resume: bool) -> bool:
    """Make the run folder ready; True when the run continues from its checkpoint.

    A run that stopped before its first checkpoint (a crash, a kill) starts again from step 0 on resume.
    """
    if resume:
        if (out / CHECKPOINT).is_file():
            return True
        if not (out / RECIPE).is_file():
            raise BoomerangError(f"no run in {out}: it has no {RECIPE}; start a run without --resume")
        changed = recipe_changes(read_recipe(out).to_dict(), cfg.to_dict())
        if changed:
            raise BoomerangError(f"the recipe differs from the run's in {changed}; resume with the run's own recipe "
                                 f"({out / RECIPE})")
        return False  # started, never checkpointed: from step 0, in the same folder
    if (out / CHECKPOINT).is_file() or (out / RECIPE).is_file():
        raise BoomerangError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BoomerangError(f"{out} exists and is not an empty folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BoomerangError(f"cannot create the run folder {out}: {exc.strerror}") from None
    return False


def load_data(cfg: DistillConfig, teacher: Teacher, phases: Phases | None = None):
    if cfg.data == "teacher":
        slots = cfg.teacher_docs * d.TEACHER_DOC_TOKENS  # an upper bound: a batch ends when all its rows do
        with (phases or Phases()).run("writing the teacher's corpus", slots, "tokens") as step:
            docs = d.teacher_documents(teacher, n_docs=cfg.teacher_docs, seed=cfg.seed,
                                       cache_dir=boomerang_home() / "corpora", on_tokens=step)
        desc = f"teacher-written ({cfg.teacher_docs} documents)"
    elif cfg.data.startswith("hub:"):
        max_chars = (cfg.max_tokens or 2_000_000) * 6
        docs, desc = d.stream_hub_documents(cfg.data[4:], text_field=cfg.text_field, max_chars=max_chars), cfg.data
    else:
        docs, desc = d.read_documents(cfg.data, text_field=cfg.text_field), str(Path(cfg.data).expanduser().resolve())
    stream = d.pack(docs, teacher.tokenizer, cfg.seq_len, max_tokens=cfg.max_tokens)
    train, heldout = d.split_blocks(stream, cfg.seq_len, cfg.heldout_fraction, desc)
    return d.TokenData(train, heldout, desc)


def _freeze(student: torch.nn.Module, cfg: DistillConfig, plan: LayerPlan) -> None:
    arch = adapter_for(student)
    ends = arch.end_modules(student)
    for path, module in ends.items():
        is_embedding = path[-1] in arch.embeddings
        if (is_embedding and cfg.freeze_embeddings) or (not is_embedding and cfg.freeze_head):
            module.requires_grad_(False)
    if cfg.freeze_single_blocks:
        for j, (a, b) in enumerate(plan.spans):
            if b - a == 1:
                arch.layer_list(student)[j].requires_grad_(False)


def make_optimizer(student: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    arch = adapter_for(student)
    embed_ids = {id(p) for path, m in arch.end_modules(student).items() for p in m.parameters()
                 if path[-1] in arch.embeddings}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in student.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embed_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw8bit":
        device = next(student.parameters()).device
        return eight_bit_adamw(device)(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def eight_bit_adamw(device: torch.device):
    """bitsandbytes' 8-bit AdamW class, or a BoomerangError saying why it cannot run here (checked before a run
    loads its teacher)."""
    if device.type != "cuda":
        raise BoomerangError(f"--optimizer adamw8bit runs on CUDA only (bitsandbytes' 8-bit AdamW): this run is on "
                             f"{device.type}; use --optimizer adamw")
    try:
        import bitsandbytes  # optional, CUDA only
    except ImportError:
        raise BoomerangError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes "
                             "(or use --optimizer adamw)") from None
    return bitsandbytes.optim.AdamW8bit


def _schedule(cfg: DistillConfig) -> Callable[[int], float]:
    warm = max(1, math.ceil(cfg.warmup * cfg.steps)) if cfg.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, cfg.steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- one step


@dataclass
class LossParts:
    total: torch.Tensor
    terms: dict[str, float]
    """Each active term's value (unweighted)."""


def loss_step(run: Run, ids: torch.Tensor, patched: frozenset[int] | set[int] = frozenset()) -> LossParts:
    """The weighted loss of one micro-batch `ids` (B, T), and each active term's value."""
    cfg, mask = run.cfg, torch.ones_like(ids)
    terms = active_terms(cfg)
    needs = needs_of(cfg)
    compute = cfg.autocast_dtype(run.device)
    autocast = torch.autocast(run.device.type, dtype=compute) if compute is not None else nullcontext()
    with autocast:
        student_logits = teacher_logits = None
        if "student" in needs:
            # a mixed size shares the student's and teacher's modules (and their hooks): it runs before the
            # teacher, whose own forward then rewrites every teacher state the hooks keep
            if patched:
                assert run.family is not None, "setup builds the family for a recipe that trains mixed sizes"
            model = run.family.build_patched(patched) if run.family and patched else run.student
            student_logits = model(ids, use_cache=False).logits
        if "teacher" in needs:
            with torch.no_grad():
                teacher_logits = run.teacher.model(ids, use_cache=False).logits
        inputs = LossInputs(run, ids, mask, student_logits, teacher_logits)
        values = {name: term.compute(inputs) for name, term in terms.items()}
    total = sum(getattr(cfg, terms[name].weight) * value for name, value in values.items())
    for store in run.captured.values():
        store.clear()
    return LossParts(total, {name: float(value.detach()) for name, value in values.items()})


def optimizer_step(run: Run, step: int) -> tuple[float, dict[str, float], float]:
    """One optimizer step over `grad_accum` micro-batches: (loss, terms, gradient norm), averaged over ranks."""
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)
    parts = []
    rank, world = parallel.world()
    for micro in range(cfg.grad_accum):
        # with several processes, each takes its slice of the same global batch
        batch = run.data.batch(step * cfg.grad_accum + micro, cfg.batch_size * world, cfg.seed)
        ids = batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].to(run.device)  # (B, T)
        p = loss_step(run, ids, mixed_size(cfg, run.plan, step, micro))
        (p.total / cfg.grad_accum).backward()
        for store in run.captured.values():  # a checkpointed layer's hooks fire again as the backward recomputes it
            store.clear()
        parts.append(p)
    params = [p for p in run.student.parameters() if p.requires_grad]
    if not run.sharded:  # FSDP has already reduced (and averaged) each gradient shard
        parallel.average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    names = list(parts[0].terms)  # the same terms, in the same order, on every rank
    local = [sum(float(p.total.detach()) for p in parts) / len(parts),
             *(sum(p.terms[name] for p in parts) / len(parts) for name in names)]
    loss, *values = parallel.all_mean(local, run.device)
    if not (math.isfinite(loss) and math.isfinite(float(norm))):  # the same numbers on every rank: all stop
        raise NonFiniteLoss(step + 1, loss, float(norm), cfg.lr)
    run.optimizer.step()
    run.scheduler.step()
    return loss, dict(zip(names, values, strict=False)), float(norm)


class NonFiniteLoss(BoomerangError):
    """The loss or the gradient norm stopped being a finite number; no weight was changed by that step."""

    def __init__(self, step: int, loss: float, norm: float, lr: float):
        super().__init__(f"the loss became {loss} (gradient norm {norm}) at step {step}: training stopped before that "
                         f"step changed any weight, and no student was written; the last checkpoint stays as it was. "
                         f"Lower the learning rate (lr {lr:g}) or check the data, then resume")


# ----------------------------------------------------------------------------- run and finish


def distill(cfg: DistillConfig, *, on_step: Callable[[StepReport], None] | None = None,
            should_stop: Callable[[], bool] | None = None, resume: bool = False,
            teacher: Teacher | None = None, on_phase: Callable[[Phase], None] | None = None) -> DistillResult:
    """Distill a student as `cfg` says; resumable, observable, stoppable within one step.

    `on_step` hears every training step, `on_phase` the phases before it (see `setup`)."""
    phases: dict[str, Phase] = {}

    def seen(p: Phase) -> None:
        phases[p.name] = p
        if on_phase:
            on_phase(p)

    run = setup(cfg, resume=resume, teacher=teacher, on_phase=seen)

    def heard(report: StepReport) -> None:
        # the rates so far, recorded a few steps in and at every checkpoint: the next launch's duration line (and
        # one made while this run goes on) uses them without waiting for the run to end
        if parallel.world()[0] == 0 and (report.step - run.start_step == RATE_AFTER_STEPS or report.checkpoint):
            _record_timing(run, phases, report)
        if on_step:
            on_step(report)

    try:
        result = run_loop(run, on_step=heard, should_stop=should_stop)
    finally:
        for handle in run.hooks:
            handle.remove()
    if parallel.world()[0] == 0:
        _record_timing(run, phases, result.last)
        if result.student_dir is not None and not run.sharded:  # sharded: measured where the family is opened
            # the family's patch order is chosen once, as it is saved: the best measured per size
            manifest = read_manifest(result.student_dir)
            with torch.no_grad():
                measure_best(run.teacher, run.student.eval(), manifest, result.student_dir, phases=Phases(seen))
    return result


RATE_AFTER_STEPS = 3
"""Steps after which a run first records its training rate (the first step's warm-up averaged with two more)."""


def _record_timing(run: Run, phases: dict[str, Phase], last: StepReport | None) -> None:
    """What this run measured, for the next launch's duration estimate (boomerang.training.timing)."""

    def ran(name: str) -> Phase | None:  # a phase run to its end, or None
        p = phases.get(name)
        return p if p is not None and p.done == p.total and p.elapsed_s > 0 else None

    corpus, importance = ran("writing the teacher's corpus"), ran("measuring layer importance")
    timing.record(run.teacher.fingerprint, run.device.type, bool(run.cfg.mix_prob),
                  train_tokens_per_s=last.tokens_per_s if last else None,
                  corpus_tokens_per_s=corpus.done / corpus.elapsed_s if corpus else None,
                  importance_s=importance.elapsed_s if importance else None)


def run_loop(run: Run, *, on_step=None, should_stop=None) -> DistillResult:
    cfg = run.cfg
    rank, world = parallel.world()
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    start, last = time.perf_counter(), None
    saved_at = start
    step = run.start_step
    while step < cfg.steps:
        loss, terms, norm = optimizer_step(run, step)
        step += 1
        now = time.perf_counter()
        elapsed = now - start
        rate = (step - run.start_step) * tokens_per_step / elapsed
        # ranks' clocks differ: a checkpoint any rank finds due is written by all
        due = parallel.any_rank(step % cfg.checkpoint_every == 0 or step == cfg.steps
                                or now - saved_at > CHECKPOINT_MAX_AGE_S, run.device)
        lr = float(run.scheduler.get_last_lr()[0])
        last = StepReport(step, cfg.steps, loss, terms, lr, norm, step * tokens_per_step, rate, elapsed,
                          (cfg.steps - step) * tokens_per_step / rate, checkpoint=due)
        if rank == 0:
            with open(run.out / METRICS, "a") as f:
                f.write(json.dumps(last.to_dict()) + "\n")
            if on_step:
                on_step(last)
        stop = parallel.any_rank(bool(should_stop and should_stop()), run.device)
        if stop or due:
            save_checkpoint(run, step)  # every rank: a sharded student is gathered first
            saved_at = time.perf_counter()
        if stop and step < cfg.steps:
            parallel.barrier()
            return DistillResult(run.out, step, True, None, last)
    student_dir = finish(run, step)
    parallel.barrier()
    return DistillResult(run.out, step, False, student_dir, last)


def finish(run: Run, step: int) -> Path | None:
    """Write the student folder (rank 0; every rank takes part in gathering a sharded student)."""

    cfg = run.cfg
    student = _plain_student(run)
    rank, world = parallel.world()
    if rank != 0:
        return None
    summary = {"steps": step, "tokens": step * cfg.batch_size * cfg.seq_len * cfg.grad_accum * world,
               "data": run.data.description, "recipe": str(run.out / RECIPE)}
    manifest = Manifest(run.teacher.source, run.teacher.fingerprint, run.plan,
                        teacher_revision=run.teacher.revision, distilled=summary if step else None)
    assert student is not None  # gathered on rank 0
    folder = save_student(student.eval(), run.teacher.tokenizer, manifest, run.out / STUDENT, overwrite=True)

    d.save_heldout(run.data.heldout, folder)  # the run's own held-out text: the default label-free evaluation
    return folder


def _plain_student(run: Run) -> CausalLM | None:
    """The student as an ordinary model; a sharded one is gathered and rebuilt on rank 0 (None elsewhere)."""
    from transformers import AutoModelForCausalLM  # the Auto classes take ~0.5 s to import
    if not run.sharded:
        return run.student

    weights, _ = parallel.full_state(run.student, run.optimizer, run.sharded)
    if parallel.world()[0] != 0:
        return None
    model = AutoModelForCausalLM.from_config(copy.deepcopy(run.student.config), dtype=run.teacher.model.dtype)
    model.load_state_dict(weights)
    return model
