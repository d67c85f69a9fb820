"""What the command groups share: the teacher, plan and order flags, and loading a teacher or a family from them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields

from boomerang.family import Family
from boomerang.models import load_teacher as load_model
from boomerang.plan import LayerPlan, PaperRule, parse_layer_list
from boomerang.precision import DTYPE_HELP
from boomerang.settings import field_docs
from boomerang.student import Manifest, cut_student, family_order, open_family
from boomerang.training.checkpoint import is_run_folder, snapshot


@dataclass(frozen=True)
class RequestCommand:
    """How a command line builds one kind of job request: its flags and the request from parsed flags.

    `boomerang submit KIND` (the jobs layer) is made from these, its help from the job registry's row; the direct
    commands share the flags."""

    add_flags: Callable[[argparse.ArgumentParser], None]
    from_args: Callable[[argparse.Namespace], object]


def add_teacher(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    """--teacher, --dtype (`dtype`: its default; commands that write weights keep float32), --device."""
    p.add_argument("--teacher", default=None,
                   help="default | hub id | local model folder | .gguf file (default: the student's teacher, "
                        "or the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=dtype, help=DTYPE_HELP if dtype == "auto" else
                   f"{dtype} (default) | bfloat16 | float16 | auto (what `boomerang teacher` reports)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_remote_code(p)


def add_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def add_plan(p: argparse.ArgumentParser) -> None:
    """The paper's rule's fields as flags (defaults and help from `PaperRule`), or an explicit list."""
    rule, docs = PaperRule(), field_docs(PaperRule)
    g = p.add_argument_group(f"layer plan (paper default: keep first {rule.keep_first}, every {rule.every}th, "
                             f"last {rule.keep_last})")
    for f in fields(PaperRule):
        g.add_argument("--" + f.name.replace("_", "-"), type=int, default=getattr(rule, f.name), help=docs[f.name])
    g.add_argument("--keep", default=None, help="explicit kept teacher layers instead, e.g. 0,2,4-10,29")


def add_order(p: argparse.ArgumentParser) -> None:
    p.add_argument("--order", default="best",
                   help="patch order: best (the default: the best of last, first, greedy and reverse measured size by "
                        "size, kept in the student folder; last for a freshly cut student) | last (the paper's default) "
                        "| first (the paper's choice for Llama-3) | greedy (closest to the teacher in KL at each size, "
                        "from the student up) | reverse (the same from the teacher down) | a list of student layers")
    p.add_argument("--calibration", default=None, help="text file for the greedy order (and eval's drop-bi ranking "
                   "when the held-out text has no spare blocks; default: a built-in text)")
    add_ends(p)


def add_ends(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ends", default="student",
                   help="whose embeddings and final norm + head the sizes between student and teacher use: student "
                        "(default) | teacher | auto (the paper's reference code: teacher ends on the patched side)")


def add_family_flags(p: argparse.ArgumentParser) -> None:
    """What names a family without a student folder: the teacher, the plan that cuts it, the patch order."""
    add_teacher(p)
    add_plan(p)
    add_order(p)


def plan_from_args(args, n_teacher: int) -> LayerPlan:
    if getattr(args, "keep", None):
        return LayerPlan(n_teacher, tuple(parse_layer_list(args.keep)))
    return LayerPlan.from_rule(n_teacher, PaperRule(args.keep_first, args.every, args.keep_last))


def load_teacher(args, default_source: str = "default"):
    return load_model(getattr(args, "teacher", None) or default_source, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code)


def student_folder(path: str) -> str:
    """A student folder as given, or a run folder's last checkpoint as one (written once per step)."""
    if not is_run_folder(path):
        return path
    folder = snapshot(path)
    print(f"the run's last checkpoint, as a student folder: {folder}", file=sys.stderr)
    return str(folder)


def load_family(args):
    """(teacher, family, student label) from --teacher/--student and plan/order flags."""
    if args.student:
        args.student = student_folder(args.student)
        opened = open_family(args.student, teacher=args.teacher, order=args.order, calibration=args.calibration,
                             ends=args.ends, load=lambda source: load_teacher(args, source))
        return opened.teacher, opened.family, str(opened.folder)
    teacher = load_teacher(args)
    plan = plan_from_args(args, teacher.n_layers)
    student = cut_student(teacher.model, plan, share=True)
    # the fresh student's manifest, unsaved: its orders resolve the way a student folder's do
    order = family_order(Manifest(teacher.source, teacher.fingerprint, plan),
                         "last" if args.order == "best" else args.order, teacher, student, args.calibration)
    return teacher, Family(teacher.model, student, plan, order=order, ends=args.ends), "(freshly cut, undistilled)"
