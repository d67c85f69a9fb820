"""The training half of the method: distill a cut student toward its teacher, resumably.

`distill(cfg, on_step=..., should_stop=...)` reads `setup -> run -> finish`. The library reports
(every step goes to the callback and to `metrics.jsonl`) and the caller decides (the stop flag is
checked after every optimizer step; stopping saves a checkpoint).

A run folder (`cfg.out`) holds `recipe.json` (every setting), `metrics.jsonl` (one line per step),
`checkpoint.pt` (written atomically every `checkpoint_every` steps, on stop and at the end) and, at
the end, `student/`: the student folder with its manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from boomerang.arch import adapter_for
from boomerang.errors import BoomerangError
from boomerang.losses import cosine_alignment, kl_to_teacher, next_token_cross_entropy, relative_mse
from boomerang.models import Teacher, boomerang_home, load_teacher
from boomerang.plan import LayerPlan, PaperRule

RECIPE, METRICS, CHECKPOINT, STUDENT, PLAN = "recipe.json", "metrics.jsonl", "checkpoint.pt", "student", "plan.json"

IMPORTANCE_BLOCKS = 8
"""Training blocks the importance plan is measured on (the first batch of the run's own order)."""

RECIPES: dict[str, dict] = {
    "paper": {},  # DistillConfig's defaults are the paper's
    # The best of the tries on a 2-core CPU (docs/distillation.md, try 7): pure distillation (KL, no CE), a plan
    # that keeps the layers the teacher cannot lose, half the batches training a random size of the family,
    # norms matched as well as directions, the teacher's ends and single-layer blocks left as they are.
    "cpu": {"plan": "importance", "ce_weight": 0.0, "kl_weight": 1.0, "mse_weight": 1.0, "mix_prob": 0.5,
            "freeze_embeddings": True, "freeze_head": True, "freeze_single_blocks": True, "warmup": 0.05},
}


@dataclass
class DistillConfig:
    """Every setting of a distillation run; a recipe file has exactly these keys."""

    teacher: str = "default"
    """Teacher: default | hub id | local folder | .gguf file."""
    data: str = "teacher"
    """Training text: a .txt/.jsonl/.parquet file or folder, hub:NAME[:SPLIT], or teacher (self-written)."""
    out: str = "runs/distill"
    """Run folder: recipe, metrics, checkpoint and, at the end, the student folder."""
    steps: int = 300
    """Optimizer steps; 0 writes the freshly cut, undistilled student."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 128
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; not norms, biases or embeddings)."""
    warmup: float = 0.01
    """Warm-up, as a fraction of the steps."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine | constant."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule, as a fraction of lr."""
    clip: float = 1.0
    """Gradient-norm clipping; 0 turns it off."""
    ce_weight: float = 1.0
    """Weight of next-token cross-entropy on the training text; 0 switches it off."""
    kl_weight: float = 0.1
    """Weight of KL(teacher || student) on the logits; 0 switches it off."""
    cosine_weight: float = 2.0
    """Weight of the cosine alignment loss, divided by the number of aligned states; 0 switches it off."""
    mse_weight: float = 0.0
    """Weight of a relative-MSE term on the aligned states (norms as well as directions), divided like cosine; 0: off (paper)."""
    mix_prob: float = 0.0
    """Fraction of micro-batches that train a random size of the family (last-k order, 1 to all-but-one blocks
    patched back with the teacher's frozen blocks) instead of the student alone, so student layers learn to work
    beside teacher blocks; 0: off (paper)."""
    local_weight: float = 0.0
    """Weight of the blockwise term, divided like cosine: each student layer, run on the teacher's input to its
    block, must give the block's output (relative MSE). It makes every student layer a drop-in for its block,
    whatever the other layers are; 0: off (paper)."""
    temperature: float = 1.0
    """Softmax temperature of the KL term."""
    freeze_embeddings: bool = False
    """Keep the input embeddings at the teacher's (with tied embeddings, the head too)."""
    freeze_head: bool = False
    """Keep the output head and final norm at the teacher's (with tied embeddings, the embeddings too)."""
    freeze_single_blocks: bool = False
    """Keep student layers that stand for one teacher layer (e.g. the last 2) at the teacher's weights."""
    keep_first: int = 1
    """Plan: leading teacher layers kept."""
    every: int = 2
    """Plan: keep one layer in `every` after the first ones."""
    keep_last: int = 2
    """Plan: trailing teacher layers kept."""
    keep: list[int] | None = None
    """Plan: explicit kept teacher layers (overrides the rule)."""
    plan: str = "rule"
    """Plan: rule (keep_first, every, keep_last) | importance (as many layers as the rule keeps, dropping those whose
    loss costs the teacher least on the first training blocks; never more than `every` in a row)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet/hub data."""
    heldout_fraction: float = 0.1
    """Fraction of the token stream held out (its end)."""
    max_tokens: int | None = None
    """Use at most this many tokens of the data (None: all)."""
    teacher_docs: int = 256
    """Documents the teacher writes when data is `teacher`."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps (and always on stop and at the end)."""
    seed: int = 0
    """Seed for the batch order and everything random."""
    device: str = "auto"
    """auto (CUDA if present) | cpu | cuda | cuda:N."""
    dtype: str = "float32"
    """Weights' dtype; on CUDA the forward runs under bf16 autocast."""
    processes: int = 1
    """Processes (one per GPU) sharing each global batch; `boomerang distill` and the workers start them with torchrun."""
    fsdp: bool = False
    """Shard the teacher and the student over the processes (FSDP, one unit per layer): for teachers too large for one device."""

    def __post_init__(self):
        positive = ("batch_size", "seq_len", "grad_accum", "checkpoint_every", "teacher_docs", "processes")
        for name in positive:
            if getattr(self, name) < 1:
                raise BoomerangError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise BoomerangError(f"steps must be 0 or more, got {self.steps}")
        if self.lr <= 0:
            raise BoomerangError(f"lr must be positive, got {self.lr}")
        for name in ("ce_weight", "kl_weight", "cosine_weight", "mse_weight", "local_weight", "weight_decay", "clip",
                     "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise BoomerangError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.ce_weight == self.kl_weight == self.cosine_weight == self.mse_weight == self.local_weight == 0:
            raise BoomerangError("every loss weight is 0: switch on at least one of ce_weight, kl_weight, "
                                 "cosine_weight, mse_weight, local_weight")
        if not 0 <= self.mix_prob <= 1:
            raise BoomerangError(f"mix_prob is a probability in [0, 1], got {self.mix_prob}")
        if self.mix_prob and self.fsdp:
            raise BoomerangError("mix_prob and fsdp cannot be combined yet: a mixed size would run sharded layers "
                                 "outside their FSDP units; use data parallelism (no --fsdp) or mix_prob 0")
        if not 0 <= self.warmup < 1:
            raise BoomerangError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 < self.heldout_fraction < 1:
            raise BoomerangError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.plan not in ("rule", "importance"):
            raise BoomerangError(f"plan must be rule or importance, got {self.plan!r}")
        if self.schedule not in ("cosine", "constant"):
            raise BoomerangError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.temperature <= 0:
            raise BoomerangError(f"temperature must be positive, got {self.temperature}")
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(self, beta) < 1:
                raise BoomerangError(f"{beta} must be in [0, 1), got {getattr(self, beta)}")
        PaperRule(self.keep_first, self.every, self.keep_last)  # validates the rule's numbers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BoomerangError(f"unknown recipe keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "DistillConfig":
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except FileNotFoundError:
            raise BoomerangError(f"recipe file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise BoomerangError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_dict(data)

    def plan_for(self, n_teacher: int) -> LayerPlan:
        """The plan by the rule or the explicit list (with plan=importance: the rule's, whose size it keeps)."""
        if self.keep:
            return LayerPlan(n_teacher, tuple(self.keep))
        return LayerPlan.from_rule(n_teacher, PaperRule(self.keep_first, self.every, self.keep_last))

    def resolve_plan(self, teacher_model: torch.nn.Module, ids: torch.Tensor) -> LayerPlan:
        """The run's plan; with plan=importance, measured on the teacher with `ids` (B, T)."""
        rule_plan = self.plan_for(teacher_model.config.num_hidden_layers)
        if self.keep or self.plan == "rule":
            return rule_plan
        from boomerang.baselines import drop_one_costs
        from boomerang.plan import importance_plan

        costs = drop_one_costs(teacher_model, ids)
        return importance_plan(costs, rule_plan.n_student, keep_first=self.keep_first, keep_last=self.keep_last,
                               max_run=self.every)


@dataclass
class StepReport:
    """What the callback gets after every optimizer step."""

    step: int
    total: int
    loss: float
    ce: float
    kl: float
    cosine: float
    mse: float
    local: float
    lr: float
    grad_norm: float
    tokens: int
    """Tokens seen so far in the run."""
    tokens_per_s: float
    elapsed_s: float
    eta_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DistillResult:
    out: Path
    steps_done: int
    stopped: bool
    student_dir: Path | None
    last: StepReport | None = None


@dataclass
class _Run:
    cfg: DistillConfig
    out: Path
    teacher: Teacher
    student: torch.nn.Module
    plan: LayerPlan
    data: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    start_step: int = 0
    sharded: bool = False
    """True when the teacher and student are sharded with FSDP over several processes."""
    family: object = None
    """The family of teacher and student (for mix_prob: random sizes trained in place of the student)."""
    captured: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    """Hook handles on the teacher and student; removed when the run ends (the teacher may be reused)."""


# ----------------------------------------------------------------------------- data parallelism


def _world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _all_mean(values: list[float], device) -> list[float]:
    """The mean over ranks of a few numbers (loss terms), for logging."""
    rank, world = _world()
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def _average_gradients(params: list[torch.Tensor]) -> None:
    """Average gradients over ranks: every rank then takes the same optimizer step."""
    rank, world = _world()
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _any_rank(flag: bool, device) -> bool:
    rank, world = _world()
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier() -> None:
    if _world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BoomerangError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return torch.device(name)


def check_world(cfg: DistillConfig) -> None:
    """The processes a run has must be the ones its recipe asks for."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        raise BoomerangError(f"processes={cfg.processes} needs one process per share: run `boomerang distill` (it starts "
                             f"them with torchrun), queue a job, or run torchrun --nproc-per-node {cfg.processes} yourself")
    if cfg.processes > 1 and launched != cfg.processes:
        raise BoomerangError(f"the recipe asks for {cfg.processes} processes but {launched} were started")


def setup(cfg: DistillConfig, *, resume: bool = False, teacher: Teacher | None = None) -> _Run:
    check_world(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL and FSDP work on the current device
    init_distributed(device)
    rank, world = _world()
    sharded = cfg.fsdp and world > 1
    out = _prepare_out(cfg, resume) if rank == 0 else Path(cfg.out).expanduser().resolve()
    _barrier()
    if sharded:  # each process reads the teacher on the host and keeps only its shards on the device
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device="cpu")
    teacher = teacher or load_teacher(cfg.teacher, dtype=cfg.dtype, device=str(device))
    data = load_data(cfg, teacher)
    if resume and (out / PLAN).is_file():  # the plan the run started with, however it was chosen
        plan = LayerPlan(teacher.n_layers, tuple(json.loads((out / PLAN).read_text())["kept"]))
    else:
        plan = cfg.resolve_plan(teacher.model, data.batch(0, IMPORTANCE_BLOCKS, cfg.seed).to(teacher.model.device))
    from boomerang.student import cut_student

    student = cut_student(teacher.model, plan).train().requires_grad_(True)
    _freeze(student, cfg, plan)
    if sharded:
        _shard(teacher.model, device, world)
        _shard(student, device, world)
    else:
        student.to(device)
    optimizer = _optimizer(student, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    run = _Run(cfg, out, teacher, student, plan, data, optimizer, scheduler, device, sharded=sharded)
    if cfg.mix_prob:
        from boomerang.family import Family

        run.family = Family(teacher.model, student, plan, order="last")
    _attach_capture(run)
    if resume:
        _load_checkpoint(run)
    elif rank == 0:
        (out / RECIPE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / PLAN).write_text(json.dumps(plan.to_dict()) + "\n")
        (out / METRICS).write_text("")
    _barrier()
    return run


def _shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2: every decoder layer its own unit, the rest (embeddings, head) in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in adapter_for(model).layer_list(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _prepare_out(cfg: DistillConfig, resume: bool) -> Path:
    out = Path(cfg.out).expanduser().resolve()
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise BoomerangError(f"nothing to resume in {out}: it has no {CHECKPOINT}; start a run without --resume")
        return out
    if (out / CHECKPOINT).is_file() or (out / RECIPE).is_file():
        raise BoomerangError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BoomerangError(f"{out} exists and is not an empty folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(cfg: DistillConfig, teacher: Teacher):
    from boomerang import data as d

    if cfg.data == "teacher":
        docs = d.teacher_documents(teacher, n_docs=cfg.teacher_docs, seed=cfg.seed,
                                   cache_dir=boomerang_home() / "corpora")
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


def _optimizer(student: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    arch = adapter_for(student)
    embed_ids = {id(p) for path, m in arch.end_modules(student).items() for p in m.parameters()
                 if path[-1] in arch.embeddings}
    decay, no_decay = [], []
    for p in student.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embed_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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


def _attach_capture(run: _Run) -> None:
    """Forward hooks on the teacher and student.

    They keep the outputs of aligned layers (every student layer, its teacher block) and, for the
    blockwise term, the teacher's inputs to each block: the arguments its first layer was called with.
    """
    arch = adapter_for(run.student)

    def keep(store: dict, key):
        def hook(module, args, output):
            store[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def keep_call(store: dict, key):
        def hook(module, args, kwargs):
            store[key] = (args, kwargs)
        return hook

    run.captured = {"student": {}, "teacher": {}, "teacher_in": {}}
    cfg = run.cfg
    if cfg.cosine_weight or cfg.mse_weight:
        for j, i in run.plan.alignment:
            run.hooks.append(arch.layer_list(run.student)[j].register_forward_hook(keep(run.captured["student"], j)))
    if cfg.cosine_weight or cfg.mse_weight or cfg.local_weight:
        for j, i in run.plan.alignment:
            layer = arch.layer_list(run.teacher.model)[i]
            run.hooks.append(layer.register_forward_hook(keep(run.captured["teacher"], j)))
    if cfg.local_weight:
        for j, (a, b) in enumerate(run.plan.spans):
            if j in run.plan.patchable:
                layer = arch.layer_list(run.teacher.model)[a]
                run.hooks.append(layer.register_forward_pre_hook(keep_call(run.captured["teacher_in"], j),
                                                                 with_kwargs=True))


def _blockwise_states(run: _Run) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each patchable student layer run on its block's teacher input, beside the block's teacher output."""
    layers = adapter_for(run.student).layer_list(run.student)
    outs, targets = [], []
    for j in sorted(run.captured["teacher_in"]):
        args, kwargs = run.captured["teacher_in"][j]
        kwargs = {**kwargs, "use_cache": False}
        for name in ("past_key_values", "past_key_value", "layer_past"):
            if name in kwargs:
                kwargs[name] = None
        out = layers[j](*args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
        targets.append(run.captured["teacher"][j])
    return outs, targets


# ----------------------------------------------------------------------------- one step


@dataclass
class LossParts:
    total: torch.Tensor
    ce: float
    kl: float
    cosine: float
    mse: float
    local: float = 0.0


def mixed_size(cfg: DistillConfig, plan: LayerPlan, step: int, micro: int) -> set[int]:
    """The student layers patched back for this micro-batch (empty: the student itself).

    Drawn from the seed and the position alone, so a resumed run and every process draw alike.
    """
    rng = random.Random((cfg.seed * 1_000_003 + step) * 1_009 + micro)
    blocks = plan.patchable
    if not cfg.mix_prob or len(blocks) < 2 or rng.random() >= cfg.mix_prob:
        return set()
    k = rng.randint(1, len(blocks) - 1)
    return set(blocks[-k:])  # last-k: the paper's default order


def _loss_step(run: _Run, ids: torch.Tensor, patched: set[int] = frozenset()) -> LossParts:
    cfg, mask = run.cfg, torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" else _nullcontext()
    with autocast:
        zero = torch.zeros((), dtype=torch.float32, device=ids.device)
        ce = kl = cos = mse = local = zero
        if cfg.ce_weight or cfg.kl_weight or cfg.cosine_weight or cfg.mse_weight:
            # a mixed size shares the student's and teacher's modules (and their hooks): it runs before the
            # teacher, whose own forward then rewrites every teacher state the hooks keep
            model = run.family.build_patched(patched) if patched else run.student
            student_logits = model(ids, use_cache=False).logits
        with torch.no_grad():
            needs_teacher = cfg.kl_weight or cfg.cosine_weight or cfg.mse_weight or cfg.local_weight
            teacher_logits = run.teacher.model(ids, use_cache=False).logits if needs_teacher else None
        if cfg.ce_weight or cfg.kl_weight or cfg.cosine_weight or cfg.mse_weight:
            ce = next_token_cross_entropy(student_logits, ids, mask) if cfg.ce_weight else zero
            kl = kl_to_teacher(student_logits, teacher_logits, mask, cfg.temperature) if cfg.kl_weight else zero
            pairs = sorted(run.captured["student"])
            s_states = [run.captured["student"][j] for j in pairs]
            t_states = [run.captured["teacher"][j] for j in pairs]
            cos = cosine_alignment(s_states, t_states, mask) / len(pairs) if cfg.cosine_weight else zero
            mse = relative_mse(s_states, t_states, mask) / len(pairs) if cfg.mse_weight else zero
        if cfg.local_weight:
            outs, targets = _blockwise_states(run)
            local = relative_mse(outs, targets, mask) / len(run.plan.alignment)
    total = (cfg.ce_weight * ce + cfg.kl_weight * kl + cfg.cosine_weight * cos + cfg.mse_weight * mse
             + cfg.local_weight * local)
    for store in run.captured.values():
        store.clear()
    return LossParts(total, *(float(x.detach()) for x in (ce, kl, cos, mse, local)))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _optimizer_step(run: _Run, step: int) -> tuple[LossParts, float]:
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)
    parts = []
    rank, world = _world()
    for micro in range(cfg.grad_accum):
        # with several processes, each takes its slice of the same global batch
        batch = run.data.batch(step * cfg.grad_accum + micro, cfg.batch_size * world, cfg.seed)
        ids = batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].to(run.device)  # (B, T)
        p = _loss_step(run, ids, mixed_size(cfg, run.plan, step, micro))
        (p.total / cfg.grad_accum).backward()
        parts.append(p)
    params = [p for p in run.student.parameters() if p.requires_grad]
    if not run.sharded:  # FSDP has already reduced (and averaged) each gradient shard
        _average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    run.optimizer.step()
    run.scheduler.step()
    n = len(parts)
    local = [sum(float(p.total.detach()) for p in parts) / n, sum(p.ce for p in parts) / n,
             sum(p.kl for p in parts) / n, sum(p.cosine for p in parts) / n, sum(p.mse for p in parts) / n,
             sum(p.local for p in parts) / n]
    return LossParts(*_all_mean(local, run.device)), float(norm)


# ----------------------------------------------------------------------------- run and finish


def distill(cfg: DistillConfig, *, on_step: Callable[[StepReport], None] | None = None,
            should_stop: Callable[[], bool] | None = None, resume: bool = False,
            teacher: Teacher | None = None) -> DistillResult:
    """Distill a student as `cfg` says; resumable, observable, stoppable within one step."""
    run = setup(cfg, resume=resume, teacher=teacher)
    try:
        return run_loop(run, on_step=on_step, should_stop=should_stop)
    finally:
        for handle in run.hooks:
            handle.remove()


def run_loop(run: _Run, *, on_step=None, should_stop=None) -> DistillResult:
    cfg = run.cfg
    rank, world = _world()
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    start, last = time.perf_counter(), None
    step = run.start_step
    while step < cfg.steps:
        parts, norm = _optimizer_step(run, step)
        step += 1
        elapsed = time.perf_counter() - start
        rate = (step - run.start_step) * tokens_per_step / elapsed
        last = StepReport(step, cfg.steps, float(parts.total), parts.ce, parts.kl, parts.cosine, parts.mse,
                          parts.local, run.scheduler.get_last_lr()[0], norm, step * tokens_per_step, rate, elapsed,
                          (cfg.steps - step) * tokens_per_step / rate)
        if rank == 0:
            with open(run.out / METRICS, "a") as f:
                f.write(json.dumps(last.to_dict()) + "\n")
            if on_step:
                on_step(last)
        stop = _any_rank(bool(should_stop and should_stop()), run.device)
        if stop or step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(run, step)  # every rank: a sharded student is gathered first
        if stop and step < cfg.steps:
            _barrier()
            return DistillResult(run.out, step, True, None, last)
    student_dir = finish(run, step)
    _barrier()
    return DistillResult(run.out, step, False, student_dir, last)


def finish(run: _Run, step: int) -> Path | None:
    """Write the student folder (rank 0; every rank takes part in gathering a sharded student)."""
    from boomerang.student import Manifest, save_student

    cfg = run.cfg
    student = _plain_student(run)
    if _world()[0] != 0:
        return None
    summary = {"steps": step, "tokens": step * cfg.batch_size * cfg.seq_len * cfg.grad_accum * _world()[1],
               "data": run.data.description, "recipe": str(run.out / RECIPE)}
    manifest = Manifest(run.teacher.source, run.teacher.fingerprint, run.plan,
                        teacher_revision=run.teacher.revision, distilled=summary if step else None)
    return save_student(student.eval(), run.teacher.tokenizer, manifest, run.out / STUDENT, overwrite=True)


def _full_state(run: _Run) -> tuple[dict, dict]:
    """The student's and optimizer's state dicts, whole (gathered from every rank when sharded, on the CPU)."""
    if not run.sharded:
        return run.student.state_dict(), run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(run.student, options=options),
            get_optimizer_state_dict(run.student, run.optimizer, options=options))


def _plain_student(run: _Run) -> torch.nn.Module | None:
    """The student as an ordinary model; a sharded one is gathered and rebuilt on rank 0 (None elsewhere)."""
    if not run.sharded:
        return run.student
    import copy

    from transformers import AutoModelForCausalLM

    weights, _ = _full_state(run)
    if _world()[0] != 0:
        return None
    model = AutoModelForCausalLM.from_config(copy.deepcopy(run.student.config), dtype=run.teacher.model.dtype)
    model.load_state_dict(weights)
    return model


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: _Run, step: int) -> Path | None:
    """Everything needed to continue: written (by rank 0) to a temporary file, then renamed over the last one."""
    student, optimizer = _full_state(run)
    if _world()[0] != 0:
        return None
    state = {
        "step": step,
        "student": student,
        "optimizer": optimizer,
        "scheduler": run.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": run.cfg.to_dict(),
    }
    path = run.out / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _load_checkpoint(run: _Run) -> None:
    state = torch.load(run.out / CHECKPOINT, map_location="cpu" if run.sharded else run.device, weights_only=False)
    if state["config"] != run.cfg.to_dict():
        changed = sorted(k for k in state["config"] if state["config"][k] != run.cfg.to_dict().get(k))
        raise BoomerangError(f"the recipe differs from the run's in {changed}; resume with the run's own recipe "
                             f"({run.out / RECIPE})")
    if run.sharded:  # every rank reads the whole checkpoint and keeps its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(run.student, state["student"], options=options)
        set_optimizer_state_dict(run.student, run.optimizer, state["optimizer"], options=options)
    else:
        run.student.load_state_dict(state["student"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.start_step = state["step"]
    if _world()[0] == 0:
        truncate_metrics(run.out / METRICS, run.start_step)


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint file holds (read lazily: the weights are not loaded)."""
    return int(torch.load(path, mmap=True, map_location="cpu", weights_only=False)["step"])


def truncate_metrics(path: Path, steps: int) -> None:
    """Keep the metric lines of the steps the checkpoint holds: a resumed step is logged once."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= steps]
    path.write_text("".join(kept))


def read_recipe(out: str | Path) -> DistillConfig:
    return DistillConfig.from_file(Path(out).expanduser() / RECIPE)
