"""A distillation run's settings: `DistillConfig`, the named recipes (JSON files beside this module), reading them.

A recipe file has exactly `DistillConfig`'s keys (any subset); the named recipes are such files in
`boomerang/training/recipes/`, so `--recipe cpu` and `--recipe path/to/cpu.json` are the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from boomerang import precision
from boomerang.arch import CausalLM
from boomerang.data import read_documents
from boomerang.errors import BoomerangError
from boomerang.importance import drop_one_costs
from boomerang.models import normalize_source, teacher_limits
from boomerang.plan import LayerPlan, PaperRule, importance_plan
from boomerang.progress import Phases
from boomerang.settings import Settings

RECIPES_DIR = Path(__file__).parent / "recipes"
RECIPE = "recipe.json"
"""The file in a run folder that holds the run's full settings."""


PRECISIONS = ("auto", "bf16", "fp32")
LIMITS = {"steps": (0, 10_000_000), "batch_size": (1, 65_536), "seq_len": (1, 1_048_576), "grad_accum": (1, 65_536),
          "checkpoint_every": (1, 10_000_000), "teacher_docs": (1, 1_000_000), "processes": (1, 4_096),
          "nnodes": (1, 4_096), "max_tokens": (1, 10**13)}
"""Bounds of the whole-number settings (inclusive): past them a setting is a typo, refused before any work."""


OPTIMIZERS = ("adamw", "adamw8bit")
"""What `DistillConfig.optimizer` may name."""


@dataclass
class DistillConfig(Settings):
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
    optimizer: str = "adamw"
    """adamw (torch's), or adamw8bit: bitsandbytes' 8-bit AdamW, its state a quarter of AdamW's (CUDA only, with
    bitsandbytes installed)."""
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
    checkpointing: bool = False
    """Activation checkpointing: keep only each student layer's input and recompute the rest in the backward pass
    (activations fall to about one layer's, at about a third more compute)."""
    loss_chunk: int = 0
    """Positions per chunk of the cross-entropy and KL terms, each chunk recomputed in the backward pass: no
    float32 (tokens x vocabulary) copy beyond the logits and their gradient (0: the whole micro-batch at once).
    For large vocabularies; `boomerang distill --estimate` says when it is needed."""
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
    """Weights' (and the optimizer's) dtype."""
    precision: str = "auto"
    """The forward passes' compute type, under autocast with the weights in `dtype`: auto (bf16 on CUDA, and on a CPU
    with native bfloat16 measured faster here; else fp32) | bf16 | fp32."""
    processes: int = 1
    """Processes on each machine (one per GPU) sharing each global batch; `boomerang distill` and the workers start them
    with torchrun."""
    nnodes: int = 1
    """Machines the run spans, each running `processes` processes (torchrun's multi-node rendezvous: every machine runs
    `boomerang distill` with the same settings, its own --node-rank and node 0's --rdzv HOST:PORT)."""
    node_queues: list[str] = field(default_factory=list)
    """A queued job over `nnodes` machines: the queue of a worker on each other machine, nnodes - 1 of them (node 1's
    first). The job's own worker is node 0; it queues a `node` job on each (docs/scale-out.md)."""
    fsdp: bool = False
    """Shard the teacher and the student over the processes (FSDP, one unit per layer): for teachers too large for one device."""
    evaluate: bool = False
    """When the family is saved, evaluate it the standard way (the shipped tasks at up to 100 items each, the run's held-out
    text, cost, both baselines): inline in `boomerang distill`, as a queued evaluation job from a worker."""

    def __post_init__(self):
        self.check_types()

        self.teacher = normalize_source(self.teacher)  # one spelling per teacher, in every row and file
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise BoomerangError(f"{name} must be {'at least 1' if low == 1 else f'{low} or more'}, got {value}")
            if value is not None and value > high:
                raise BoomerangError(f"{name} must be at most {high:,}, got {value:,}")
        if self.lr <= 0:
            raise BoomerangError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise BoomerangError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in (*self.loss_weights(), "weight_decay", "clip", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise BoomerangError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not any(getattr(self, name) for name in self.loss_weights()):
            raise BoomerangError(f"every loss weight is 0: switch on at least one of {', '.join(self.loss_weights())}")
        if not 0 <= self.mix_prob <= 1:
            raise BoomerangError(f"mix_prob is a probability in [0, 1], got {self.mix_prob}")
        if self.mix_prob and self.fsdp:
            raise BoomerangError("mix_prob and fsdp cannot be combined yet: a mixed size would run sharded layers "
                                 "outside their FSDP units; use data parallelism (no --fsdp) or mix_prob 0")
        if not 0 <= self.warmup < 1:
            raise BoomerangError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 < self.heldout_fraction < 1:
            raise BoomerangError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.precision not in PRECISIONS:
            raise BoomerangError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.plan not in ("rule", "importance"):
            raise BoomerangError(f"plan must be rule or importance, got {self.plan!r}")
        if self.schedule not in ("cosine", "constant"):
            raise BoomerangError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.loss_chunk < 0:
            raise BoomerangError(f"loss_chunk must be 0 (off) or a number of positions, got {self.loss_chunk}")
        if self.temperature <= 0:
            raise BoomerangError(f"temperature must be positive, got {self.temperature}")
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(self, beta) < 1:
                raise BoomerangError(f"{beta} must be in [0, 1), got {getattr(self, beta)}")
        PaperRule(self.keep_first, self.every, self.keep_last)  # validates the rule's numbers
        self.node_queues = list(self.node_queues)
        if self.node_queues and len(self.node_queues) != self.nnodes - 1:
            raise BoomerangError(f"node_queues names the queue of each machine but node 0's: {self.nnodes - 1} for "
                                 f"nnodes={self.nnodes}, got {len(self.node_queues)}")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype the forward passes autocast to on `device` (None: they run in the weights' dtype)."""
        if self.precision == "fp32" or device.type not in ("cpu", "cuda"):
            return None
        if self.precision == "bf16" or (device.type == "cuda" and not torch.cuda.is_available()):
            return torch.bfloat16  # asked for; or planned (an estimate) for a GPU this host does not have
        return torch.bfloat16 if precision.auto_dtype(device) == "bfloat16" else None

    @classmethod
    def loss_weights(cls) -> tuple[str, ...]:
        """The fields that weigh a loss term (every `*_weight` field); a term with weight 0 is off."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name.endswith("_weight") and f.name != "weight_decay")

    @classmethod
    def from_file(cls, path: str | Path) -> "DistillConfig":
        return cls.from_dict(read_recipe_file(path), source=f"recipe {path}")

    def plan_for(self, n_teacher: int) -> LayerPlan:
        """The plan by the rule or the explicit list (with plan=importance: the rule's, whose size it keeps)."""
        if self.keep:
            return LayerPlan(n_teacher, tuple(self.keep))
        return LayerPlan.from_rule(n_teacher, PaperRule(self.keep_first, self.every, self.keep_last))

    def resolve_plan(self, teacher_model: CausalLM, ids: torch.Tensor, phases=None) -> LayerPlan:
        """The run's plan; with plan=importance, measured on the teacher with `ids` (B, T) (a phase of `phases`)."""
        rule_plan = self.plan_for(teacher_model.config.num_hidden_layers)
        if self.keep or self.plan == "rule":
            return rule_plan

        n = teacher_model.config.num_hidden_layers
        with (phases or Phases()).run("measuring layer importance", n, "layers") as step:
            costs = drop_one_costs(teacher_model, ids, on_layer=step)
        return importance_plan(costs, rule_plan.n_student, keep_first=self.keep_first, keep_last=self.keep_last,
                               max_run=self.every)

    @property
    def world_size(self) -> int:
        """Processes sharing each global batch, over every machine."""
        return self.processes * self.nnodes

    def check(self) -> None:
        """Checks against the world, before any work: the teacher's config, the plan on it, the sequence length
        against its context, processes against this machine, the data's lines.

        Cheap (no weights are loaded): what a queued job is checked with before it is accepted.
        """

        n_layers, context = teacher_limits(self.teacher)
        self.plan_for(n_layers)
        if context and self.seq_len > context:
            raise BoomerangError(f"seq_len {self.seq_len:,} is longer than the teacher's context ({context:,} tokens)")
        if self.device == "cpu" and self.processes > (os.cpu_count() or 1):
            raise BoomerangError(f"processes={self.processes} on the CPU, but this machine has {os.cpu_count()} cores")
        if self.data != "teacher" and not self.data.startswith("hub:"):
            path = Path(self.data).expanduser()
            if not path.exists():
                raise BoomerangError(f"data not found: {path}")
            if path.is_file() and path.stat().st_size < 50_000_000:
                read_documents(str(path), text_field=self.text_field)  # bad lines are named now, not hours later


# ----------------------------------------------------------------------------- named recipes and recipe files


@cache
def recipe_names() -> tuple[str, ...]:
    """The named recipes: the JSON files of `boomerang/training/recipes/`, paper first."""
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
    return tuple(sorted(names, key=lambda n: n != "paper"))


def named_recipe(name: str) -> dict:
    """The settings a named recipe changes from DistillConfig's defaults (a copy)."""
    if name not in recipe_names():
        raise BoomerangError(f"unknown recipe {name!r}: use one of {', '.join(recipe_names())} or a JSON file")
    return read_recipe_file(RECIPES_DIR / f"{name}.json")


def recipe_settings(name_or_file: str) -> dict:
    """A named recipe's or a recipe file's settings, validated."""
    data = named_recipe(name_or_file) if name_or_file in recipe_names() else read_recipe_file(name_or_file)
    DistillConfig.from_dict(data, source=f"recipe {name_or_file}")
    return data


def read_recipe_file(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise BoomerangError(f"recipe file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BoomerangError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    except OSError as exc:
        raise BoomerangError(f"cannot read recipe {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise BoomerangError(f"recipe {path}: a recipe is a JSON object of settings, got {type(data).__name__}")
    return data


AFTER_RUN = ("out", "evaluate", "node_queues")
"""Fields that are not settings of the training: where the run folder is (a folder moved or copied
elsewhere resumes), what happens once the family is saved, and which workers run a queued run's other machines."""


def recipe_changes(old: dict, new: dict) -> list[str]:
    """The settings in which two recipes of one run differ (AFTER_RUN fields are not settings of the run)."""
    return sorted(k for k in set(old) | set(new) if k not in AFTER_RUN and old.get(k) != new.get(k))


def read_recipe(out: str | Path) -> DistillConfig:
    """The full settings of the run in folder `out`."""
    folder = Path(out).expanduser()
    if not (folder / RECIPE).is_file():
        raise BoomerangError(f"no run in {folder}: it has no {RECIPE}")
    return DistillConfig.from_file(folder / RECIPE)
