"""Building any size between student and teacher by patching teacher blocks back into the student.

A size is assembled, never copied: its layer list holds the teacher's and the student's own layer
modules (their parameters are the same tensors), so building one costs microseconds per layer and no
weight memory. Two things a shared layer carries must differ per size, and are handled here:

- `layer_idx`, which indexes the KV cache. Each size gets a shallow clone of every layer (and of each
  submodule that carries `layer_idx`) with its own index; the parameters are still shared, and the
  teacher's and student's own modules are never mutated, so a size and the teacher can generate at
  the same time in two threads.
- per-layer config fields (`layer_types`: sliding vs. full attention). Each block keeps the type it
  was trained with, and the size's config lists, position by position, the type of the block there.

The size with every block patched is the teacher itself, and the size with none the student. Whose
input embeddings and whose final norm + head ("ends") the sizes in between use is the family's `ends`:
"student" (the default), "teacher", or "auto": the paper's reference code's convention, teacher ends on
the patched side (the teacher's norm and head once the topmost patchable block is the teacher's, as in
every last-k size; the teacher's embeddings once the lowest one is, as in every first-k size).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from boomerang.arch import Arch, CausalLM, adapter_for
from boomerang.errors import BoomerangError
from boomerang.plan import LayerPlan

ORDERS = ("last", "first", "greedy", "reverse", "best")
ENDS = ("student", "teacher", "auto")


def check_ends(ends) -> str:
    """`ends` if it is one of ENDS; otherwise a BoomerangError quoting (at most 40 characters of) it."""
    if ends not in ENDS:
        raise BoomerangError(f"ends must be one of {', '.join(ENDS)}, got {str(ends)[:40]!r}")
    return ends


# ----------------------------------------------------------------------------- assembling a model


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter, buffer and child of `module`."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def _carries_layer_idx(module: nn.Module) -> bool:
    return "layer_idx" in module.__dict__ or any(_carries_layer_idx(c) for c in module._modules.values() if c is not None)


def rebind_layer(layer: nn.Module, idx: int) -> nn.Module:
    """A clone of a decoder layer whose `layer_idx` (and its submodules') is `idx`; weights shared."""
    clone = _shallow(layer)
    if "layer_idx" in layer.__dict__:
        clone.layer_idx = idx  # type: ignore[assignment]  # a plain attribute, not a submodule
    for name, child in layer._modules.items():
        if child is not None and _carries_layer_idx(child):
            clone._modules[name] = rebind_layer(child, idx)
    return clone


def assemble(
    skeleton: CausalLM,
    layers: Sequence[nn.Module],
    layer_types: Sequence[str] | None,
    ends: dict[tuple[str, ...], nn.Module] | None = None,
) -> CausalLM:
    """A causal LM shaped like `skeleton` running `layers` in order, sharing every weight.

    `ends` replaces some of the skeleton's non-layer modules (keyed as in `Arch.end_modules`). The
    returned model has its own config (layer count, per-layer fields, tying) and its own layer clones;
    if its head and token embedding end up different tensors, it is marked untied.
    """
    arch = adapter_for(skeleton)
    top = _shallow(skeleton)
    base = _shallow(arch.base_model(skeleton))
    top._modules[arch.base] = base
    for path, module in (ends or {}).items():
        (top if len(path) == 1 else base)._modules[path[-1]] = module
    base._modules[arch.layers] = nn.ModuleList(rebind_layer(layer, i) for i, layer in enumerate(layers))
    config = copy.deepcopy(skeleton.config)
    config.num_hidden_layers = len(layers)
    if layer_types is not None:
        config.layer_types = list(layer_types)
    arch.fit_config(config, layers)
    config.tie_word_embeddings = arch.head_module(top).weight is arch.token_embedding(top).weight
    top.config = config  # type: ignore[assignment]  # plain attributes of the model objects
    base.config = config  # type: ignore[assignment]
    return top  # type: ignore[return-value]  # a shallow copy of the skeleton: its class


def layer_types_of(model: nn.Module) -> list[str] | None:
    types = getattr(model.config, "layer_types", None)
    return list(types) if types is not None else None


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SizeInfo:
    """One member of a family."""

    n_layers: int
    """Decoder layers of this size (its name)."""
    patched: tuple[int, ...]
    """Student layers replaced by the teacher blocks they stand for."""
    layers: tuple[str, ...]
    """What runs, position by position: "T5" is teacher layer 5, "S3" student layer 3."""
    params: int
    """All parameters (embeddings and head counted once if tied)."""
    params_no_embed: int
    """Parameters without the input embeddings and output head."""
    is_teacher: bool = False
    is_student: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def compress_runs(layers) -> str:
    """["S0","S1","T4","T5","T6"] -> "S0-1 T4-6"."""
    out: list[str] = []
    start: tuple = ()
    prev: tuple = ()
    for name in (*layers, None):
        kind, idx = (name[0], int(name[1:])) if name else (None, None)
        if prev and (kind != prev[0] or idx != prev[1] + 1):
            out.append(f"{start[0]}{start[1]}" + (f"-{prev[1]}" if prev[1] != start[1] else ""))
            start = ()
        if name and not start:
            start = (kind, idx)
        prev = (kind, idx) if name else ()
    return " ".join(out)


def count_params(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


class Family:
    """A teacher and a student of it, and every size in between, built on demand.

    `order` is "last" (patch the last student blocks first; the paper's default), "first" (the
    paper's choice for Llama-3), an explicit sequence of student layers (a greedy order once computed,
    see `greedy_patch_order`), or a schedule `{layer count: patched student layers}` that need not be
    nested (the best measured per size, see `best_schedule`). `ends` is one of ENDS (see the module's
    docstring).
    """

    def __init__(self, teacher: CausalLM, student: CausalLM, plan: LayerPlan,
                 order: str | Sequence[int] | Mapping[int, Sequence[int]] = "last", ends: str = "student"):
        self.teacher, self.student, self.plan, self.ends = teacher, student, plan, check_ends(ends)
        self.arch: Arch = adapter_for(teacher)
        if adapter_for(student) is not self.arch:
            raise BoomerangError("the student is not of the teacher's architecture")
        _check_shapes(self.arch, teacher, student, plan)
        if isinstance(order, Mapping):
            self.order: tuple[int, ...] | None = None
            """The nested patch order, or None for a schedule that is not one."""
            self.schedule = check_schedule(plan, order)
        else:
            self.order = resolve_order(plan, order)
            self.schedule = schedule_of(plan, self.order)
        self._t_layers = list(self.arch.layer_list(teacher))
        self._s_layers = list(self.arch.layer_list(student))
        self._t_types = layer_types_of(teacher)
        self._s_types = layer_types_of(student)

    # sizes are named by their layer count
    @property
    def layer_counts(self) -> list[int]:
        return sorted(self.schedule)

    def patched_for(self, n_layers: int) -> tuple[int, ...]:
        counts = self.layer_counts
        if n_layers not in counts:
            below = [c for c in counts if c < n_layers][-1:]
            above = [c for c in counts if c > n_layers][:1]
            nearest = " or ".join(map(str, below + above))
            raise BoomerangError(
                f"no size with {n_layers} layers in this family: sizes are {counts[0]}..{counts[-1]} "
                f"layers ({', '.join(map(str, counts))}); nearest: {nearest}"
            )
        return self.schedule[n_layers]

    def build(self, n_layers: int) -> CausalLM:
        """The size with `n_layers` decoder layers, sharing every weight with teacher and student."""
        if n_layers == self.plan.n_teacher:
            return self.teacher
        return self.build_patched(self.patched_for(n_layers))

    def ends_for(self, patched: Iterable[int]) -> tuple[str, str]:
        """Whose (embeddings, final norm + head) a size with these student layers patched uses."""
        patched = set(patched)
        if not patched or self.ends == "student":
            return "student", "student"
        if self.ends == "teacher":
            return "teacher", "teacher"
        blocks = self.plan.patchable
        return ("teacher" if blocks[0] in patched else "student", "teacher" if blocks[-1] in patched else "student")

    def build_patched(self, patched: Iterable[int], *, embeddings: str | None = None,
                      head: str | None = None) -> CausalLM:
        """Any set of patched student layers (singletons too).

        `embeddings` and `head` ("student" or "teacher") say whose input embeddings and whose final
        norm + head the model uses (default: as the family's `ends` says); mixing them on a tied model
        leaves the two untied.
        """
        patched = set(patched)
        default_embeddings, default_head = self.ends_for(patched)
        embeddings, head = embeddings or default_embeddings, head or default_head
        for what, who in (("embeddings", embeddings), ("head", head)):
            if who not in ("student", "teacher"):
                raise BoomerangError(f"{what} must come from 'student' or 'teacher', got {who!r}")
        bad = patched - set(range(self.plan.n_student))
        if bad:
            raise BoomerangError(f"student layers {sorted(bad)} do not exist: the student has {self.plan.n_student}")
        seq = self.plan.layers_after_patching(patched)
        layers = [self._t_layers[i] if who == "teacher" else self._s_layers[i] for who, i in seq]
        types = None
        if self._t_types is not None and self._s_types is not None:
            types = [self._t_types[i] if who == "teacher" else self._s_types[i] for who, i in seq]
        return assemble(self.student, layers, types, ends=self._ends(embeddings, head))

    def _ends(self, embeddings: str, head: str) -> dict[tuple[str, ...], nn.Module]:
        pick = {"student": self.student, "teacher": self.teacher}
        a = self.arch
        ends = {path: m for path, m in a.end_modules(pick[embeddings]).items() if path[-1] in a.embeddings}
        ends.update({path: m for path, m in a.end_modules(pick[head]).items() if path[-1] not in a.embeddings})
        return ends

    def info(self, n_layers: int) -> SizeInfo:
        patched = self.patched_for(n_layers)
        is_teacher = n_layers == self.plan.n_teacher
        seq = ([("teacher", i) for i in range(self.plan.n_teacher)] if is_teacher
               else self.plan.layers_after_patching(set(patched)))
        layer_mods = [self._t_layers[i] if w == "teacher" else self._s_layers[i] for w, i in seq]
        ends = (self.arch.end_modules(self.teacher) if is_teacher else self._ends(*self.ends_for(patched)))
        body = count_params(layer_mods) + count_params([ends[(self.arch.base, self.arch.norm)]])
        total = count_params([*layer_mods, *ends.values()])
        return SizeInfo(
            n_layers=n_layers,
            patched=tuple(sorted(patched)),
            layers=tuple(("T" if w == "teacher" else "S") + str(i) for w, i in seq),
            params=total,
            params_no_embed=body,
            is_teacher=is_teacher,
            is_student=not patched,
        )

    def sizes(self) -> list[SizeInfo]:
        return [self.info(n) for n in self.layer_counts]


def _check_shapes(arch: Arch, teacher: nn.Module, student: nn.Module, plan: LayerPlan) -> None:
    n_t, n_s = len(arch.layer_list(teacher)), len(arch.layer_list(student))
    if n_t != plan.n_teacher or n_s != plan.n_student:
        raise BoomerangError(
            f"the plan is for a {plan.n_teacher}-layer teacher and {plan.n_student}-layer student, "
            f"got {n_t} and {n_s} layers"
        )
    for j, i in enumerate(plan.kept):
        s_shapes = [tuple(p.shape) for p in arch.layer_list(student)[j].parameters()]
        t_shapes = [tuple(p.shape) for p in arch.layer_list(teacher)[i].parameters()]
        if s_shapes != t_shapes:
            raise BoomerangError(f"student layer {j} does not have the shapes of teacher layer {i}")


def schedule_of(plan: LayerPlan, order: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """{layer count: patched student layers} of a nested patch order, smallest size first."""
    return {plan.n_layers(set(order[:k])): tuple(order[:k]) for k in range(len(order) + 1)}


def check_schedule(plan: LayerPlan, sizes: Mapping) -> dict[int, tuple[int, ...]]:
    """A per-size schedule checked against the plan: each size's patched layers are patchable, give it its layer
    count, and the student and the teacher are among the sizes. Keys may be strings (a JSON file's)."""
    out: dict[int, tuple[int, ...]] = {}
    for n, patched in sizes.items():
        layers = tuple(int(j) for j in patched)
        wrong = sorted(set(layers) - set(plan.patchable))
        if wrong or len(set(layers)) != len(layers):
            raise BoomerangError(f"size {n}: {list(layers)} are not distinct patchable student layers "
                                 f"(patchable: {list(plan.patchable)})")
        if plan.n_layers(set(layers)) != int(n):
            raise BoomerangError(f"size {n}: patching {list(layers)} gives {plan.n_layers(set(layers))} layers, not {n}")
        out[int(n)] = layers
    if plan.n_student not in out or plan.n_teacher not in out:
        raise BoomerangError(f"a schedule must hold the student ({plan.n_student} layers) and the teacher "
                             f"({plan.n_teacher}), got sizes {sorted(out)}")
    return dict(sorted(out.items()))


def resolve_order(plan: LayerPlan, order: str | Sequence[int]) -> tuple[int, ...]:
    """The full patch order (student layers) for "last", "first" or an explicit list."""
    blocks = plan.patchable
    if isinstance(order, str):
        if order == "last":
            return tuple(reversed(blocks))
        if order == "first":
            return tuple(blocks)
        if order in ("greedy", "reverse"):
            function = "reverse_greedy_patch_order" if order == "reverse" else "greedy_patch_order"
            raise BoomerangError(f"the {order} order must be computed first: use {function}(...)")
        raise BoomerangError(f"unknown patch order {order!r}: use one of {', '.join(ORDERS)} or a list of student layers")
    order = tuple(int(j) for j in order)
    if sorted(order) != sorted(blocks):
        raise BoomerangError(
            f"an explicit patch order must list every patchable student layer once: expected a "
            f"permutation of {list(blocks)}, got {list(order)}"
        )
    return order


# ----------------------------------------------------------------------------- greedy order


def mean_kl(teacher_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(teacher || model), logits (B, T, V)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def greedy_patch_order(teacher: CausalLM, student: CausalLM, plan: LayerPlan,
                       calibration: torch.Tensor | list[torch.Tensor], on_step=None) -> tuple[int, ...]:
    """Size by size, patch the block that keeps the model closest to the teacher (mean KL).

    `calibration` is a (B, T) batch of token ids, or a list of them; it costs about n^2/2 forwards for n blocks.
    """
    return _greedy(teacher, student, plan, calibration, on_step, from_teacher=False)


def reverse_greedy_patch_order(teacher: CausalLM, student: CausalLM, plan: LayerPlan,
                               calibration: torch.Tensor | list[torch.Tensor], on_step=None) -> tuple[int, ...]:
    """Greedy from the other end: from every block patched, size by size, take back the block whose student layer
    keeps the model closest to the teacher (mean KL); the patch order is that sequence reversed, so the large sizes
    are chosen as carefully as `greedy_patch_order` chooses the small ones. The same cost, about n^2/2 forwards."""
    return _greedy(teacher, student, plan, calibration, on_step, from_teacher=True)


@torch.no_grad()
def _greedy(teacher: CausalLM, student: CausalLM, plan: LayerPlan, calibration: torch.Tensor | list[torch.Tensor],
            on_step, *, from_teacher: bool) -> tuple[int, ...]:
    """One greedy pass over the blocks: each step takes the block whose move (patched in; with `from_teacher`,
    taken back out of a model with every block patched) leaves the model closest to the teacher."""
    texts = calibration if isinstance(calibration, list) else [calibration]
    fam = Family(teacher, student, plan, order="last")
    refs = [teacher(ids).logits for ids in texts]
    taken: list[int] = []
    remaining = list(plan.patchable)
    while remaining:
        scores = {j: kl_on(fam, set(remaining) - {j} if from_teacher else {*taken, j}, texts, refs) for j in remaining}
        best = min(scores, key=lambda j: scores[j])
        taken.append(best)
        remaining.remove(best)
        if on_step:
            on_step(len(taken), len(plan.patchable), best, scores[best])
    return tuple(reversed(taken)) if from_teacher else tuple(taken)


# ----------------------------------------------------------------------------- the best order, size by size


@dataclass(frozen=True)
class BestSizes:
    """Per size, the candidate patch order's layers that keep the model closest to the teacher on a calibration
    text: what `Family(order=schedule)` builds, and how it was chosen."""

    schedule: dict[int, tuple[int, ...]]
    """{layer count: patched student layers}."""
    kl: dict[int, dict[str, float]]
    """{layer count: {candidate order: mean KL(teacher || size) on the calibration text}}."""
    chosen: dict[int, str]
    """{layer count: the candidate whose layers were taken ("last+greedy" when several gave the same ones)}."""
    tokens: int
    """Calibration tokens measured."""
    left_out: dict[int, str] = field(default_factory=dict)
    """{layer count: what builds it}: sizes only other candidates reach. The family keeps the first candidate's
    sizes (each size costs models in every evaluation); these are listed, with their KL, not silently dropped."""

    def dominated(self) -> list[int]:
        """Sizes whose chosen layers are farther from the teacher on the calibration text than a smaller size's."""
        out, lowest = [], float("inf")
        for n in sorted(self.schedule):
            value = self.kl[n][self.chosen[n].split("+")[0]]
            if value > lowest:
                out.append(n)
            lowest = min(lowest, value)
        return out

    def to_dict(self) -> dict:
        return {"sizes": {str(n): list(p) for n, p in self.schedule.items()},
                "kl": {str(n): v for n, v in self.kl.items()}, "chosen": {str(n): c for n, c in self.chosen.items()},
                "tokens": self.tokens, "left_out": {str(n): why for n, why in self.left_out.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> BestSizes:
        return cls({int(n): tuple(p) for n, p in data["sizes"].items()},
                   {int(n): dict(v) for n, v in data["kl"].items()}, {int(n): c for n, c in data["chosen"].items()},
                   int(data["tokens"]), {int(n): why for n, why in data.get("left_out", {}).items()})


def kl_on(family: Family, patched: Iterable[int], texts: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """Mean KL(teacher || the size with `patched`) over every position of the calibration batches."""
    model = family.build_patched(set(patched))
    total = sum(mean_kl(ref, model(ids).logits) * ids.numel() for ids, ref in zip(texts, refs, strict=True))
    return total / sum(ids.numel() for ids in texts)


@torch.no_grad()
def best_schedule(teacher: CausalLM, student: CausalLM, plan: LayerPlan, texts: list[torch.Tensor],
                  candidates: Mapping[str, Sequence[int]], on_size=None) -> BestSizes:
    """Size by size, the candidate order whose patched layers are closest to the teacher (mean KL over the
    calibration batches `texts`, each (B, T) token ids); a tie goes to the candidate named first.

    The family keeps the sizes of the first candidate (its grid: last-k's, the paper's), each built from whichever
    candidate is closest there, so at every size it is at least as close as the first candidate on this text.
    Orders through blocks of different spans reach other sizes too: `left_out` lists them with the order that
    builds them and their KL. `on_size(done, total)` reports progress.
    """
    fam = Family(teacher, student, plan, order="last")
    refs = [teacher(ids).logits for ids in texts]
    options: dict[int, dict[tuple[int, ...], list[str]]] = {}
    for name, order in candidates.items():
        for n, patched in schedule_of(plan, resolve_order(plan, order)).items():
            options.setdefault(n, {}).setdefault(tuple(sorted(patched)), []).append(name)
    rank = {name: k for k, name in enumerate(candidates)}
    schedule, kl, chosen = {}, {}, {}
    for done, n in enumerate(sorted(options), start=1):
        scored = []
        for patched, names in options[n].items():
            value = 0.0 if n == plan.n_teacher else kl_on(fam, patched, texts, refs)
            scored.append((value, min(rank[x] for x in names), patched, names))
        kl[n] = {name: value for value, _, _, names in scored for name in names}
        _, _, schedule[n], names = min(scored)
        chosen[n] = "+".join(names)
        if on_size:
            on_size(done, len(options))
    grid = set(schedule_of(plan, resolve_order(plan, next(iter(candidates.values())))))
    left_out = {}
    for n in sorted(set(schedule) - grid):
        name = chosen[n].split("+")[0]
        left_out[n] = f"--order {name} builds it (KL {kl[n][name]:.4f} on the calibration text)"
        del schedule[n]
    return BestSizes(schedule, kl, chosen, sum(int(ids.numel()) for ids in texts), left_out)
