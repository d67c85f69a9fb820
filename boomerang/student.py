"""Cutting a student out of a teacher, and student folders: a Hugging Face folder plus `boomerang.json`.

The manifest records which teacher the student came from (source and a checksum of its weights),
the plan (kept layers, spans, alignment map) and the patch orders, so that loading a student can
check it is paired with the right teacher and rebuild its family without any other input.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import boomerang
from boomerang import data as d
from boomerang.arch import CausalLM, adapter_for
from boomerang.errors import BoomerangError
from boomerang.family import (
    BestSizes,
    Family,
    assemble,
    best_schedule,
    greedy_patch_order,
    layer_types_of,
    resolve_order,
    reverse_greedy_patch_order,
    schedule_of,
)
from boomerang.models import Teacher, load_teacher
from boomerang.outputs import replace_dir_atomically
from boomerang.plan import LayerPlan, parse_layer_list
from boomerang.progress import Phase, Phases

MANIFEST = "boomerang.json"
FORMAT = 1


def cut_student(teacher: CausalLM, plan: LayerPlan, *, share: bool = False) -> CausalLM:
    """The student: the teacher's kept layers, renumbered, with the teacher's embeddings and head.

    With `share=True` the result shares the teacher's weights (for listing or evaluating the
    undistilled family); otherwise it owns copies of them, ready to be trained.
    """
    arch = adapter_for(teacher)
    if plan.n_teacher != teacher.config.num_hidden_layers:
        raise BoomerangError(
            f"the plan is for a {plan.n_teacher}-layer teacher; this one has {teacher.config.num_hidden_layers}"
        )
    layers = [arch.layer_list(teacher)[i] for i in plan.kept]
    types = layer_types_of(teacher)
    shared = assemble(teacher, layers, [types[i] for i in plan.kept] if types else None)
    # deepcopy of the assembled model copies only what it references: the kept layers and the ends.
    return shared if share else copy.deepcopy(shared)


@dataclass
class Manifest:
    """The contents of `boomerang.json`."""

    teacher_source: str
    """How to load the teacher again: "default", a folder, a .gguf file or a hub id."""
    teacher_fingerprint: str
    """Checksum of the teacher's weights (see `models.weights_fingerprint`)."""
    plan: LayerPlan
    """Kept layers; spans, alignment and patchable blocks derive from it."""
    teacher_revision: str | None = None
    """Hub commit of the teacher, when it came from the hub."""
    patch_orders: dict[str, list[int]] = field(default_factory=dict)
    """Named patch orders (student layers, first patched first): "last", "first", and "greedy" and "reverse" once
    computed."""
    best: dict | None = None
    """The best measured patch order, size by size (`family.BestSizes.to_dict()`), once measured."""
    distilled: dict | None = None
    """Training summary (steps, tokens, recipe file) once distilled; None for a freshly cut student."""
    library_version: str = boomerang.__version__
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self):
        for name, order in [("last", "last"), ("first", "first")]:
            self.patch_orders.setdefault(name, list(resolve_order(self.plan, order)))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "library_version": self.library_version,
            "created": self.created,
            "teacher": {"source": self.teacher_source, "fingerprint": self.teacher_fingerprint,
                        "revision": self.teacher_revision, "n_layers": self.plan.n_teacher},
            "plan": self.plan.to_dict(),
            "alignment": [list(pair) for pair in self.plan.alignment],
            "patchable": list(self.plan.patchable),
            "patch_orders": self.patch_orders,
            "best_sizes": self.best,
            "distilled": self.distilled,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        if data.get("format") != FORMAT:
            raise BoomerangError(f"unknown student manifest format {data.get('format')!r} (this library reads {FORMAT})")
        t, p = data["teacher"], data["plan"]
        return cls(
            teacher_source=t["source"], teacher_fingerprint=t["fingerprint"], teacher_revision=t.get("revision"),
            plan=LayerPlan(p["n_teacher"], tuple(p["kept"])), patch_orders=data.get("patch_orders", {}),
            best=data.get("best_sizes"),
            distilled=data.get("distilled"), library_version=data.get("library_version", "?"),
            created=data.get("created", ""),
        )


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder).expanduser() / MANIFEST
    if not Path(folder).expanduser().is_dir():
        raise BoomerangError(f"student folder not found: {folder}")
    if not path.is_file():
        raise BoomerangError(f"{folder} is not a student folder: it has no {MANIFEST} (make one with `boomerang cut`)")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BoomerangError(f"{path} is damaged ({type(exc).__name__}: {exc}); cut or distill the student again") from None


def save_student(student: CausalLM, tokenizer, manifest: Manifest, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a student folder atomically: model, tokenizer and manifest appear together or not at all."""

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")

    return replace_dir_atomically(out, write, overwrite=overwrite)


def load_student(folder: str | Path, teacher: Teacher):
    """Load a student folder for `teacher`, checking the pair matches. Returns (model, manifest)."""
    manifest = read_manifest(folder)
    return _load_student_model(folder, manifest, teacher), manifest


def _load_student_model(folder: str | Path, manifest: Manifest, teacher: Teacher) -> CausalLM:
    """The student's weights, on the teacher's device and in its dtype, after checking the pair."""
    from transformers import AutoModelForCausalLM  # the Auto classes take ~0.5 s to import

    check_teacher(manifest, teacher)
    model = AutoModelForCausalLM.from_pretrained(Path(folder).expanduser(), dtype=teacher.model.dtype)
    adapter_for(model)
    if model.config.num_hidden_layers != manifest.plan.n_student:
        raise BoomerangError(
            f"{folder}: the model has {model.config.num_hidden_layers} layers but the manifest's plan keeps "
            f"{manifest.plan.n_student}; the folder is inconsistent"
        )
    model = model.to(teacher.device).eval()  # type: ignore[arg-type]  # transformers types .to wrongly
    share_unchanged(model, teacher.model, manifest.plan)
    return model


def share_unchanged(student: CausalLM, teacher: CausalLM, plan: LayerPlan) -> int:
    """Make a student opened for use hold the teacher's own tensors wherever its are equal to them: the ends and the
    single-layer blocks a recipe froze (the `cpu` recipe freezes both), or any weight training left as it was. The
    family then keeps one copy of each, and every path that runs several of its models at once (the evaluation, the
    chat, the server) calls such a layer once for the rows of all of them (`sharing.model_path` knows a layer by its
    tensors). Only equal tensors are shared, so every model computes what it did; ties (a head tied to the
    embeddings) stay tied. Returns the number of tensors now shared. Never for a student about to be trained: it
    must own its weights."""
    import torch

    arch = adapter_for(student)
    ends, teacher_ends = arch.end_modules(student), arch.end_modules(teacher)
    pairs = [(m, teacher_ends[path]) for path, m in ends.items() if path in teacher_ends]
    layers, teacher_layers = arch.layer_list(student), arch.layer_list(teacher)
    pairs += [(layers[j], teacher_layers[a]) for j, (a, b) in enumerate(plan.spans) if b - a == 1]
    same: dict[int, torch.Tensor] = {}
    for mine, theirs in pairs:
        for kind in ("named_parameters", "named_buffers"):
            own, other = (dict(getattr(m, kind)(remove_duplicate=False)) for m in (mine, theirs))
            for name, t in own.items():
                u = other.get(name)
                if (u is not None and u is not t and u.shape == t.shape and u.dtype == t.dtype and u.device == t.device
                        and torch.equal(u, t)):
                    same[id(t)] = u
    for module in student.modules():  # every reference: a tied head is the embeddings' tensor too
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) in same:
                    table[name] = same[id(t)]  # type: ignore[assignment]
    return len(same)


@dataclass
class StudentFamily:
    """A student folder opened for use: its teacher, its family of sizes, its manifest."""

    teacher: Teacher
    family: Family
    manifest: Manifest
    folder: Path
    """The student folder, absolute."""


def named_order(manifest: Manifest, order: str | Sequence[int]) -> tuple[int, ...]:
    """A patch order named in the manifest (last, first, greedy once computed), a comma-separated list of
    student layers ("13,12,4-11"), or anything `resolve_order` accepts."""
    if isinstance(order, str) and order[:1].isdigit():
        order = parse_layer_list(order)
    named = manifest.patch_orders.get(order, order) if isinstance(order, str) else order
    return resolve_order(manifest.plan, named)


Schedule = dict[int, tuple[int, ...]]


def named_schedule(manifest: Manifest, order: str | Sequence[int]) -> Schedule:
    """{layer count: patched student layers} of an order named in the manifest: "best" once measured, else as
    `named_order`."""
    if order == "best":
        if manifest.best is None:
            raise BoomerangError("this family's best order is not measured yet: open it once (boomerang family "
                                 "--student DIR measures it and keeps it in the folder)")
        return BestSizes.from_dict(manifest.best).schedule
    return schedule_of(manifest.plan, named_order(manifest, order))


def family_order(manifest: Manifest, order: str | Sequence[int], teacher: Teacher, student: CausalLM,
                 calibration: str | None = None, folder: Path | None = None,
                 phases: Phases | None = None) -> tuple[int, ...] | Schedule:
    """The patch order to use: named in the manifest, explicit, "greedy" computed now on a calibration text (a file,
    default: a built-in text) when the manifest does not hold it, or "best": the best measured per size, measured
    now (and kept in `folder`'s manifest) when the manifest does not hold it (`measure_best`)."""
    if order == "best":
        if manifest.best is None:
            measure_best(teacher, student, manifest, folder, calibration, phases)
        return named_schedule(manifest, "best")
    if order not in ("greedy", "reverse") or order in manifest.patch_orders:
        return named_order(manifest, order)
    return greedy_order(teacher, student, manifest.plan, calibration, reverse=order == "reverse")


BEST_CANDIDATES = ("last", "first", "greedy", "reverse")
"""The orders the best one is chosen from, size by size (a tie goes to the one named first)."""


def calibration_texts(tokenizer, folder: Path | None, calibration: str | None = None) -> list:
    """The text a family's best order is measured on: the held-out blocks of its run that an evaluation does not
    read (those after the first `data.HELDOUT_EVALUATED` tokens, at most 1,024 tokens), and a general text (the
    built-in one, or the file `calibration`), so that neither the training domain nor another is sacrificed."""
    texts = []
    held = folder / d.HELDOUT_FILE if folder is not None else None
    if held is not None and held.is_file():
        _, spare = d.heldout_split(str(held), tokenizer, d.HELDOUT_EVALUATED, 1024)
        if spare.numel():
            texts.append(spare)
    general = calibration_ids(tokenizer, calibration, max_tokens=1024)  # (1, T)
    n = -(-general.shape[1] // 128)  # blocks of at most 128 tokens, as the held-out ones
    texts.append(general[:, : (general.shape[1] // n) * n].reshape(n, -1))
    return texts


def measure_best(teacher: Teacher, student: CausalLM, manifest: Manifest, folder: Path | None = None,
                 calibration: str | None = None, phases: Phases | None = None) -> BestSizes:
    """Measure the best order size by size (`family.best_schedule` over BEST_CANDIDATES, the greedy one computed
    on the same text) and keep it, with the greedy order, in the manifest (and in `folder`'s boomerang.json, when
    it can be written: a read-only folder is measured again next time)."""
    phases = phases or Phases()
    texts = [t.to(teacher.device) for t in calibration_texts(teacher.tokenizer, folder, calibration)]
    blocks = len(manifest.plan.patchable)
    with phases.run("ranking blocks for the greedy order", blocks, "blocks") as step:
        greedy = greedy_patch_order(teacher.model, student, manifest.plan, texts, on_step=lambda *_: step())
    with phases.run("ranking blocks from the teacher's end (the reverse greedy order)", blocks, "blocks") as step:
        reverse = reverse_greedy_patch_order(teacher.model, student, manifest.plan, texts, on_step=lambda *_: step())
    candidates = {"last": named_order(manifest, "last"), "first": named_order(manifest, "first"), "greedy": greedy,
                  "reverse": reverse}
    sizes = len({n for order in candidates.values() for n in schedule_of(manifest.plan, order)})
    with phases.run("choosing the best order per size", sizes, "sizes") as step:
        best = best_schedule(teacher.model, student, manifest.plan, texts, candidates, on_size=lambda *_: step())
    manifest.patch_orders["greedy"] = list(greedy)
    manifest.patch_orders["reverse"] = list(reverse)
    manifest.best = best.to_dict()
    if folder is not None:
        write_manifest(folder, manifest)
    return best


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace a student folder's boomerang.json atomically; a folder that cannot be written keeps the old one."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    try:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        print(f"note: could not keep the measured order in {path} ({exc.strerror}): it is measured again next time",
              file=sys.stderr)


def calibration_ids(tokenizer, calibration: str | None = None, max_tokens: int = 256):
    """(1, T) token ids of a calibration text (a file, default: a built-in text), at most `max_tokens`."""

    try:
        text = (Path(calibration).expanduser().read_text() if calibration
                else resources.files("boomerang.resources").joinpath("calibration.txt").read_text())
    except OSError as exc:
        raise BoomerangError(f"cannot read the calibration text {calibration}: {exc.strerror}") from None
    return tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]


def greedy_order(teacher: Teacher, student: CausalLM, plan: LayerPlan, calibration: str | None = None, *,
                 reverse: bool = False) -> tuple[int, ...]:
    """The greedy patch order (closest to the teacher in KL at each size) on 256 calibration tokens; `reverse`: greedy
    from the teacher's end (`family.reverse_greedy_patch_order`)."""

    ids = calibration_ids(teacher.tokenizer, calibration).to(teacher.device)
    name = "reverse greedy" if reverse else "greedy"
    print(f"computing the {name} order on {ids.shape[1]} calibration tokens...", file=sys.stderr)
    rank = reverse_greedy_patch_order if reverse else greedy_patch_order
    return rank(teacher.model, student, plan, ids)


def open_family(folder: str | Path, *, teacher: Teacher | str | None = None, order: str | Sequence[int] = "best",
                device: str | None = None, dtype: str | None = None, calibration: str | None = None,
                load: Callable[[str], Teacher] | None = None, ends: str = "student",
                on_phase: Callable[[Phase], None] | None = None) -> StudentFamily:
    """Open a student folder as a family, reading its manifest once.

    `teacher` is a loaded teacher, a source to load, or None for the manifest's own. `load` loads a
    source (default: `load_teacher` with `device` and `dtype`); a cache passes its own. The student
    follows the teacher's device, and is checked against the teacher's weights. `order`: see
    `family_order`; the default, "best", is measured on first use and kept in the folder (`calibration` is the
    general text for an order measured now); `on_phase` hears that measurement's phases. `ends`: see
    `family.ENDS`.
    """
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    if not isinstance(teacher, Teacher):
        if load is None:

            def load(source: str) -> Teacher:
                return load_teacher(source, dtype=dtype, device=device or "cpu")

        teacher = load(teacher or manifest.teacher_source)
    student = _load_student_model(folder, manifest, teacher)
    family = Family(teacher.model, student, manifest.plan,
                    order=family_order(manifest, order, teacher, student, calibration, folder, Phases(on_phase)),
                    ends=ends)
    return StudentFamily(teacher, family, manifest, folder)


AT_SIZE = "at-size"
"""Beside a run's `student/`: `at-size/N/`, the run folder of a student distilled at N layers with the same recipe,
data and budget (the distilled-at-size baseline; `boomerang baselines`)."""


SPLIT = "split"
"""`at-size/splitK/N/`: a student distilled at N layers with 1/K of the family's budget, one of K whose budgets add
up to the family's (`boomerang baselines --split`: the equal-total-budget comparison)."""


def at_size_students(folder: str | Path) -> list[Path]:
    """The finished distilled-at-size students of a student folder's run, smallest first: those with the family's
    budget each, then those with a split of it (`SPLIT`)."""
    root = Path(folder).expanduser().resolve().parent / AT_SIZE
    found = [p.parent for p in root.glob("*/student/" + MANIFEST) if p.parent.parent.name.isdigit()]
    split = [p.parent for p in root.glob(f"{SPLIT}*/*/student/" + MANIFEST)
             if p.parent.parent.name.isdigit() and p.parent.parent.parent.name.removeprefix(SPLIT).isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name)) + sorted(
        split, key=lambda p: (int(p.parent.parent.name.removeprefix(SPLIT)), int(p.parent.name)))


def split_of(folder: str | Path) -> int | None:
    """K for a student distilled with 1/K of its family's budget (`RUN/at-size/splitK/N/student`), else None."""
    run = Path(folder).resolve().parent
    k = run.parent.name.removeprefix(SPLIT)
    return int(k) if run.parent.name.startswith(SPLIT) and k.isdigit() and run.parent.parent.name == AT_SIZE else None


def check_teacher(manifest: Manifest, teacher: Teacher) -> None:
    if manifest.teacher_fingerprint != teacher.fingerprint:
        raise BoomerangError(
            f"this student was cut from teacher {manifest.teacher_source!r} (weights checksum "
            f"{manifest.teacher_fingerprint[:12]}), but the teacher given is {teacher.source!r} "
            f"(checksum {teacher.fingerprint[:12]}). Pass --teacher {manifest.teacher_source}"
        )
