"""How much memory a distillation needs, from the teacher's config alone, before anything is loaded.

Parameters are counted on the meta device (a hub teacher costs only its config.json). Peak memory per
device is split into the parts a user can act on:

- teacher weights (frozen; sharded over the processes with FSDP);
- student weights, gradients and AdamW's two moments (sharded with FSDP);
- activations the student keeps for its backward pass (per layer, per token of a micro-batch), and the
  teacher states the alignment terms keep;
- logits: the student's and the teacher's `(tokens x vocabulary)` tensors and what the losses derive from
  them (log-softmax of both, the gradient), the part that dominates for large vocabularies.

The per-token coefficients are measured on this project's loop (`training.measure.measure_peak`, checked within ±20 % by
tests/test_memory.py on the default teacher and on tiny configs with 97 and 151,936 vocabulary entries).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from boomerang.arch import active_intermediate_size, adapter_for
from boomerang.errors import BoomerangError
from boomerang.models import resolve_device, teacher_config

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Measured on this loop (see the module docstring): values kept per token of a micro-batch, per student layer
# (x hidden size, x intermediate size), and float32 (tokens x vocabulary) tensors alive at the peak (both
# models' logits, the log-softmaxes, the teacher's probabilities, the gradient); with `loss_chunk` only the
# logits, their gradient and one chunk's intermediates.
ACT_PER_HIDDEN = 14.0
ACT_PER_INTERMEDIATE = 4.0
CHECKPOINTED_PER_HIDDEN = 6.0
"""With activation checkpointing: values kept per token per student layer (x hidden size), besides one layer's
full activations while the backward recomputes it."""
AUTOCAST_ACT_BYTES = 3.4
"""Bytes per kept activation value under bf16 autocast on a CPU: the matrix products' outputs are bf16, the residual
stream and the norms' float32 (measured on a CPU with native bf16: a deep config 847 -> 710 MiB at the peak, fp32 ->
autocast; the estimate 706)."""
LOGITS_COPIES = 8.0
LOGITS_COPIES_CHUNKED = 2.8
"""Plus (LOGITS_COPIES - LOGITS_COPIES_CHUNKED) x the chunk's share of the sequence."""


def activation_values(cfg, layers: int, hidden: int, inter: int) -> float:
    """Values the student's backward keeps per token, over all its layers."""
    one_layer = ACT_PER_HIDDEN * hidden + ACT_PER_INTERMEDIATE * inter
    if cfg.checkpointing:
        return layers * CHECKPOINTED_PER_HIDDEN * hidden + one_layer
    return layers * one_layer


def logits_copies(cfg) -> float:
    if cfg.loss_chunk <= 0 or cfg.loss_chunk >= cfg.seq_len:
        return LOGITS_COPIES
    return LOGITS_COPIES_CHUNKED + (LOGITS_COPIES - LOGITS_COPIES_CHUNKED) * cfg.loss_chunk / cfg.seq_len


@dataclass
class MemoryEstimate:
    """Peak memory of a distillation, per device, in bytes, by part."""

    teacher_params: int
    student_params: int
    parts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    available: int | None = None
    """Memory of the device (a CUDA card's, or the machine's RAM), where known."""
    advice: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= 0.9 * self.available

    def table(self) -> str:
        gib = 2**30
        lines = [f"teacher {self.teacher_params:,} parameters, student {self.student_params:,}",
                 f"peak memory per device ({self.device}), estimated from the config:"]
        lines += [f"  {name:<20} {value / gib:8.2f} GiB" for name, value in self.parts.items()]
        lines.append(f"  {'total':<20} {self.total / gib:8.2f} GiB")
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict}: the device has {self.available / gib:.1f} GiB (a 10 % margin is kept)")
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"teacher_params": self.teacher_params, "student_params": self.student_params, "parts": self.parts,
                "total": self.total, "device": self.device, "available": self.available, "fits": self.fits,
                "advice": self.advice}


def parameter_counts(config, kept: list[int]) -> tuple[int, int]:
    """(teacher parameters, student parameters) from a config, on the meta device."""
    from transformers import AutoModelForCausalLM  # transformers' Auto classes: only when an estimate is made

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in adapter_for(model).layer_list(model)]
    total = sum(p.numel() for p in model.parameters())
    ends = total - sum(layers)
    return total, ends + sum(layers[i] for i in kept)


def device_memory(device: str) -> int | None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(index).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def estimate_memory(config, kept: list[int], cfg, *, device: str = "cpu", available: int | None = None
                    ) -> MemoryEstimate:
    """Peak memory per device of distilling a student with teacher layers `kept` as `cfg` (a DistillConfig) says."""
    if cfg.dtype not in BYTES:
        raise BoomerangError(f"dtype must be one of {', '.join(BYTES)}, got {cfg.dtype!r}")
    teacher_p, student_p = parameter_counts(config, kept)
    w = BYTES[cfg.dtype]
    world = max(1, getattr(cfg, "world_size", cfg.processes))
    shard = world if cfg.fsdp else 1
    autocast = cfg.autocast_dtype(torch.device(device)) if hasattr(cfg, "autocast_dtype") else None
    # under autocast: measured on a CPU; on CUDA (not measured yet: no GPU was lent) the bf16 size is assumed
    act = w if autocast is None else 2 if device.startswith("cuda") else AUTOCAST_ACT_BYTES
    hidden = config.hidden_size
    inter = active_intermediate_size(config)  # a mixture of experts: the experts a token passes through
    tokens = cfg.batch_size * cfg.seq_len
    aligned = len(kept) if cfg.cosine_weight or cfg.mse_weight else 0
    parts = {
        "teacher weights": teacher_p * w // shard,
        "student weights": student_p * w // shard,
        "gradients": student_p * w // shard,
        # AdamW's two moments in the weights' dtype; the 8-bit AdamW's one byte each
        "optimizer (AdamW)": 2 * student_p * (1 if getattr(cfg, "optimizer", "adamw") == "adamw8bit" else w) // shard,
        "activations": int(tokens * act * (activation_values(cfg, len(kept), hidden, inter) + aligned * hidden)),
        "logits": int(tokens * config.vocab_size * 4 * logits_copies(cfg)),
    }
    est = MemoryEstimate(teacher_p, student_p, parts, device, available if available is not None else device_memory(device))
    if est.fits is False:
        est.advice = advice(est, cfg)
    return est


def advice(est: MemoryEstimate, cfg) -> list[str]:
    """What would make a job that does not fit fit, biggest part first."""
    out = []
    p = est.parts
    if p["logits"] > 0.3 * est.total and not cfg.loss_chunk:
        out.append(f"chunked losses: --loss-chunk {max(1, cfg.seq_len // 8)} cuts the logits part by ~2.5x at a "
                   "few % more time")
    if p["activations"] > 0.2 * est.total and not cfg.checkpointing:
        out.append("activation checkpointing: --checkpointing keeps one layer's activations instead of every "
                   "layer's, at about a third more compute")
    if p["logits"] + p["activations"] > 0.3 * est.total and cfg.batch_size > 1:
        out.append(f"a smaller micro-batch: --batch-size {max(1, cfg.batch_size // 4)} --grad-accum "
                   f"{cfg.grad_accum * 4} keeps the tokens per step and cuts activations and logits by ~4x")
    if p["optimizer (AdamW)"] + p["gradients"] + p["student weights"] > 0.3 * est.total and not cfg.fsdp:
        out.append("shard the student and teacher over N devices: --processes N --fsdp divides weights, gradients "
                   "and optimizer state by N")
    if (p["optimizer (AdamW)"] > 0.1 * est.total and est.device.startswith("cuda")
            and getattr(cfg, "optimizer", "adamw") == "adamw"):
        out.append("an 8-bit optimizer: --optimizer adamw8bit (bitsandbytes) cuts the optimizer state by 4x in float32")
    if cfg.dtype == "float32" and est.device.startswith("cuda"):
        out.append("--dtype bfloat16 halves every weight, gradient and optimizer tensor")
    return out


def estimate_for(cfg) -> MemoryEstimate:
    """The estimate for a DistillConfig, its teacher read from its config alone (the rule's plan: an importance
    plan keeps as many layers)."""
    config = teacher_config(cfg.teacher)
    kept = list(cfg.plan_for(config.num_hidden_layers).kept)
    return estimate_memory(config, kept, cfg, device=str(resolve_device(cfg.device)))


def check_fits(cfg) -> MemoryEstimate:
    """Refuse, before the teacher loads, a run whose estimate exceeds the device's whole memory (the numbers
    and what would make it fit in the message); the estimate otherwise."""
    est = estimate_for(cfg)
    if est.available is not None and est.total > est.available:
        gib = 2**30
        parts = ", ".join(f"{name} {value / gib:.1f}" for name, value in est.parts.items())
        fixes = "; ".join(est.advice) or "a smaller teacher or sequence"
        raise BoomerangError(f"this run needs about {est.total / gib:.1f} GiB per device ({parts} GiB) and the device "
                             f"({est.device}) has {est.available / gib:.1f} GiB. To fit: {fixes}")
    return est
