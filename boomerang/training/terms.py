"""The loss terms of a distillation step, by name, and what each step trains.

`TERMS` is the table: a name, the DistillConfig field holding its weight, the forward passes it reads,
and the function. A term whose weight is 0 is not computed, not reported and not stored. The functions
take a `LossInputs`; `run` below is the training run of `boomerang.training.loop` (its config, plan,
models and the states its hooks captured).

`mixed_size` draws the size a micro-batch trains (the student, or a size with student layers patched
back, for a recipe with `mix_prob`), from the seed and the step alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from boomerang.arch import adapter_for
from boomerang.plan import LayerPlan
from boomerang.training.losses import cosine_alignment, kl_to_teacher, next_token_cross_entropy, relative_mse
from boomerang.training.recipe import DistillConfig


@dataclass
class LossInputs:
    """What a loss term reads: the batch, both models' logits, and the states the hooks captured."""

    run: Any
    """The training run (`loop.Run`): its config, plan, models and captured states."""
    ids: torch.Tensor
    """(B, T) token ids."""
    mask: torch.Tensor
    """(B, T) 1 where a position counts."""
    student_logits: torch.Tensor | None
    """(B, T, V), of the student or of the mixed size this micro-batch trains."""
    teacher_logits: torch.Tensor | None
    """(B, T, V), without gradient."""

    def student(self) -> torch.Tensor:
        assert self.student_logits is not None, "a term read the student's logits without 'student' in its needs"
        return self.student_logits

    def teacher(self) -> torch.Tensor:
        assert self.teacher_logits is not None, "a term read the teacher's logits without 'teacher' in its needs"
        return self.teacher_logits

    def aligned_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each student layer's output beside its teacher block's, for the student layers that ran."""
        pairs = sorted(self.run.captured["student"])
        return ([self.run.captured["student"][j] for j in pairs], [self.run.captured["teacher"][j] for j in pairs])

    def blockwise_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return blockwise_states(self.run)


@dataclass(frozen=True)
class Term:
    """One loss term: `weight` names the DistillConfig field that weighs it; `needs` the passes it reads.

    needs: "student" (the student's forward), "teacher" (the teacher's forward), "states" (each student
    layer's and its teacher block's outputs), "blockwise" (each block's teacher input).
    """

    weight: str
    needs: frozenset[str]
    compute: Callable[[LossInputs], torch.Tensor]


def _per_state(fn, states) -> torch.Tensor:
    """A loss over aligned states, divided by their number (the paper's 2.0 / number of aligned states)."""
    outs, targets = states
    return fn(outs, targets) / max(1, len(outs))


TERMS: dict[str, Term] = {
    "ce": Term("ce_weight", frozenset({"student"}),
               lambda x: next_token_cross_entropy(x.student(), x.ids, x.mask, x.run.cfg.loss_chunk)),
    "kl": Term("kl_weight", frozenset({"student", "teacher"}),
               lambda x: kl_to_teacher(x.student(), x.teacher(), x.mask, x.run.cfg.temperature, x.run.cfg.loss_chunk)),
    "cosine": Term("cosine_weight", frozenset({"student", "teacher", "states"}),
                   lambda x: _per_state(lambda s, t: cosine_alignment(s, t, x.mask), x.aligned_states())),
    "mse": Term("mse_weight", frozenset({"student", "teacher", "states"}),
                lambda x: _per_state(lambda s, t: relative_mse(s, t, x.mask), x.aligned_states())),
    "local": Term("local_weight", frozenset({"teacher", "blockwise"}),
                  lambda x: relative_mse(*x.blockwise_states(), x.mask) / len(x.run.plan.alignment)),
}
"""Every loss term by name. Adding one: its function (losses.py), its `*_weight` field, one row here."""


def active_terms(cfg: DistillConfig) -> dict[str, Term]:
    """The terms a recipe switches on (weight above 0), in TERMS' order."""
    return {name: t for name, t in TERMS.items() if getattr(cfg, t.weight)}


def needs_of(cfg: DistillConfig) -> frozenset[str]:
    return frozenset().union(*(t.needs for t in active_terms(cfg).values()))


def attach_capture(run) -> None:
    """Forward hooks on the teacher and student for the terms that read states.

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
    needs = needs_of(run.cfg)
    if "states" in needs:
        for j, _ in run.plan.alignment:
            run.hooks.append(arch.layer_list(run.student)[j].register_forward_hook(keep(run.captured["student"], j)))
    if needs & {"states", "blockwise"}:
        for j, i in run.plan.alignment:
            layer = arch.layer_list(run.teacher.model)[i]
            run.hooks.append(layer.register_forward_hook(keep(run.captured["teacher"], j)))
    if "blockwise" in needs:
        for j, (a, _b) in enumerate(run.plan.spans):
            if j in run.plan.patchable:
                layer = arch.layer_list(run.teacher.model)[a]
                run.hooks.append(layer.register_forward_pre_hook(keep_call(run.captured["teacher_in"], j),
                                                                 with_kwargs=True))


def blockwise_states(run) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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


# ----------------------------------------------------------------------------- what a step trains


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


def is_mixed_step(cfg: DistillConfig, plan: LayerPlan, step: int) -> bool:
    """Whether reported step `step` (1-based) trained a mixed size in any of its micro-batches: recomputed
    from the seed, as `mixed_size` draws it, so a loss chart can tell the two kinds of step apart."""
    return any(mixed_size(cfg, plan, step - 1, micro) for micro in range(cfg.grad_accum))
