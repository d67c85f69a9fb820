"""The `boomerang` command line: thin, one function per command, every listing also as `--json`.

A teacher (`--teacher T`) is `default`, a hub id, a local model folder or a `.gguf` file. A size is
named by its layer count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from boomerang.errors import BoomerangError


@dataclass(frozen=True)
class RequestCommand:
    """How a command line builds one kind of job request: its flags and the request from parsed flags.

    `boomerang submit KIND` (the jobs layer) is made from this table; the direct commands share the flags.
    """

    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    from_args: Callable[[argparse.Namespace], object]


def _submit_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="paper (default) | cpu | a JSON file of settings")
    _add_config_flags(p)


def _submit_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("student")
    _add_teacher(p), _add_order(p), _add_eval_flags(p)


def _submit_export_flags(p: argparse.ArgumentParser) -> None:
    _add_export_flags(p)
    p.add_argument("--order", default="last", help="patch order named in the manifest: last | first | greedy")
    _add_ends(p)


REQUEST_COMMANDS = {
    "distill": RequestCommand("queue a distillation (same settings as `boomerang distill`)", _submit_distill_flags,
                              lambda args: distill_config_from_args(args, default_recipe="paper")),
    "eval": RequestCommand("queue an evaluation (same settings as `boomerang eval`)", _submit_eval_flags,
                           lambda args: eval_request_from_args(args)),
    "export": RequestCommand("queue an export of one size", _submit_export_flags,
                             lambda args: export_request_from_args(args)),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `boomerang jobs | head -3`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BoomerangError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- shared arguments


def _add_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None,
                   help="default | hub id | local model folder | .gguf file (default: the student's teacher, "
                        "or the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 (default on CPU) | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def _add_plan(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layer plan (paper default: keep first 1, every 2nd, last 2)")
    g.add_argument("--keep-first", type=int, default=1)
    g.add_argument("--every", type=int, default=2)
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--keep", default=None, help="explicit kept teacher layers instead, e.g. 0,2,4-10,29")


def _add_order(p: argparse.ArgumentParser) -> None:
    p.add_argument("--order", default="last",
                   help="patch order: last (paper default) | first (paper's choice for Llama-3) | greedy "
                        "(closest to the teacher in KL at each size) | a list of student layers")
    p.add_argument("--calibration", default=None, help="text file for the greedy order (and eval's drop-bi ranking when "
                   "the held-out text has no spare blocks; default: a built-in text)")
    _add_ends(p)


def _add_ends(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ends", default="student",
                   help="whose embeddings and final norm + head the sizes between student and teacher use: student "
                        "(default) | teacher | auto (the paper's reference code: teacher ends on the patched side)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boomerang", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("family", help="the plan and every size of a family")
    _add_teacher(p), _add_plan(p), _add_order(p)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_family)

    p = sub.add_parser("cut", help="write the freshly cut (undistilled) student folder")
    _add_teacher(p), _add_plan(p)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    p.set_defaults(func=cmd_cut)

    p = sub.add_parser("export", help="one size as a standalone Hugging Face model folder")
    _add_teacher(p), _add_order(p), _add_export_flags(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="one prompt through any size, streamed")
    _add_teacher(p), _add_plan(p), _add_order(p)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student, undistilled)")
    p.add_argument("--layers", type=int, default=None, help="size to use (default: the teacher)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("distill", help="distill a student the boomerang way (resumable; Ctrl-C stops and checkpoints)")
    p.add_argument("--recipe", default=None,
                   help="paper | cpu | a JSON file whose keys are the settings below; default: cpu on a CPU, paper "
                        "on a GPU (docs/distillation.md says what each is)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-file", default=None,
                   help="stop after the current step, with a checkpoint, when this file appears (as Ctrl-C does)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("baselines", help="distill students at sizes of a family with its own recipe, data and budget "
                       "(the distilled-at-size baseline; resumable); eval then shows them beside the family")
    p.add_argument("student", help="the family's student folder (RUN/student)")
    p.add_argument("--sizes", default=None, help="comma-separated layer counts (default: three spread over the family)")
    p.add_argument("--order", default="last", help="the patch order whose sizes are meant (default: last)")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("compare", help="several evaluated families of one teacher on one chart, one Pareto frontier "
                       "over every series of every family")
    p.add_argument("families", nargs="+", help="student folders (their eval/) or results folders; also an earlier "
                   "comparison's families.csv (PATH.csv, or PATH.csv:NAME,NAME for some of its families)")
    p.add_argument("--name", action="append", default=None,
                   help="a name per folder, in order (default: its run folder; a table's families keep theirs)")
    p.add_argument("--out", required=True, help="folder for families.csv and charts/")
    p.add_argument("--chart-metric", default="acc", help="metric of the task charts (default acc)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("snapshot", help="a running or stopped distillation's last checkpoint as a student folder "
                       "(then eval, chat, serve or export it; eval, family, generate and heldout also take RUN itself)")
    p.add_argument("run", help="the distillation's run folder (its --out)")
    p.add_argument("--out", default=None, help="where to write it (default: RUN/snapshots/step-N)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("heldout", help="held-out perplexity, KL to the teacher and top-1 agreement of every size")
    _add_teacher(p), _add_plan(p), _add_order(p)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student)")
    p.add_argument("--data", required=True, help="text file or folder; its last --heldout-fraction is used")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to measure (default 4096)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_heldout)

    p = sub.add_parser("eval", help="evaluate every size (lm-eval, held-out text, cost) beside baselines; resumable")
    p.add_argument("student", help="student folder")
    _add_teacher(p), _add_order(p)
    _add_eval_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("teacher", help="load (and cache) a teacher and describe it")
    _add_teacher(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_teacher)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Commands of the layers above the library (jobs, workers, dashboard), registered as entry points
    in the group "boomerang.commands", so that this package never imports them."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="boomerang.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub, {"requests": REQUEST_COMMANDS})
        except ImportError as exc:  # a layer whose dependencies are missing: the library still works
            print(f"warning: commands from {ep.value} unavailable ({exc})", file=sys.stderr)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field, help from its docstring; unset flags leave the recipe's value."""
    import dataclasses

    p.add_argument("--keep-from", default=argparse.SUPPRESS, metavar="FOLDER",
                   help="pin the plan of an earlier run (its run folder or student folder): its kept layers become "
                        "--keep, so an importance plan is not measured again")

    from boomerang.settings import field_docs
    from boomerang.training.recipe import DistillConfig

    docs = field_docs(DistillConfig)
    g = p.add_argument_group("settings (defaults: the paper's; a recipe file sets them too)")
    for f in dataclasses.fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.name == "keep":
            g.add_argument(flag, default=argparse.SUPPRESS, help=help_text + "; e.g. 0,2,4-10,29")
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            g.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="", help="comma-separated task names: local file stems, shipped tasks "
                   "(arc_easy_mini, piqa_mini, hellaswag_mini) or lm-eval registry names. Name none of --tasks, "
                   "--baselines, --heldout-data, --general-data, --cost for the standard evaluation: the shipped tasks, the "
                   "run's own held-out text, the shipped general text, cost and both baselines")
    p.add_argument("--data-dir", default=None, help="folder of local evaluation .jsonl files")
    p.add_argument("--sizes", default="all", help="all | comma-separated layer counts")
    p.add_argument("--baselines", default="", help="comma-separated: undistilled, drop-bi")
    p.add_argument("--reference", action="append", default=[], help="a reference model (hub id or folder); repeatable")
    p.add_argument("--distilled", action="append", default=None,
                   help="a student distilled at one size of the family (repeatable; default: every finished one "
                        "`boomerang baselines` made for this run)")
    p.add_argument("--heldout-data", default=None, help="text file for label-free metrics (its last 10%%)")
    p.add_argument("--general-data", default=None,
                   help="text of another domain for the same metrics (all of it): a file, or 'shipped' (an excerpt "
                        "of WikiText-2 test in the package; the standard evaluation uses it)")
    p.add_argument("--heldout-tokens", type=int, default=4096, help="tokens measured on each held-out text")
    p.add_argument("--cost", action="store_true", help="also measure memory, prefill latency and decode speed")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default: STUDENT/eval)")
    p.add_argument("--chart-metric", default="acc", help="metric for the chart (default acc)")


# ----------------------------------------------------------------------------- loading helpers


def _plan_from_args(args, n_teacher: int):
    from boomerang.plan import LayerPlan, PaperRule, parse_layer_list

    if getattr(args, "keep", None):
        return LayerPlan(n_teacher, tuple(parse_layer_list(args.keep)))
    return LayerPlan.from_rule(n_teacher, PaperRule(args.keep_first, args.every, args.keep_last))


def _load_teacher(args, default_source: str = "default"):
    from boomerang.models import load_teacher

    return load_teacher(args.teacher or default_source, dtype=args.dtype, device=args.device,
                        trust_remote_code=args.trust_remote_code)


def _student_folder(path: str) -> str:
    """A student folder as given, or a run folder's last checkpoint as one (written once per step)."""
    from boomerang.training.checkpoint import is_run_folder, snapshot

    if not is_run_folder(path):
        return path
    folder = snapshot(path)
    print(f"the run's last checkpoint, as a student folder: {folder}", file=sys.stderr)
    return str(folder)


def cmd_compare(args) -> int:
    from boomerang.evaluation.chart import gap_line
    from boomerang.evaluation.compare import compare_families

    report = compare_families(args.families, args.out, names=args.name, chart_metric=args.chart_metric)
    for (task, metric), keys in report.frontiers.items():
        print(f"{task} {metric}: Pareto frontier {', '.join(keys)}")
    for (task, metric), pairs in report.gaps.items():  # the paper's central comparison, size by size
        for g in pairs:
            print(f"{task} at-size {gap_line(g, metric)}")
        won = {w: sum(g["winner"] == w for g in pairs) for w in ("distilled", "interpolated", "within noise")}
        print(f"{task} {metric}: of {len(pairs)} sizes with a student distilled at the size, the distilled student is "
              f"better at {won['distilled']}, the interpolated size at {won['interpolated']}, "
              f"{won['within noise']} within noise")
    print(f"table {report.table}")
    if report.gaps:
        print(f"table {report.table.with_name('at-size.csv')}")
    for path in report.charts:
        print(f"chart {path}")
    return 0


def cmd_snapshot(args) -> int:
    from boomerang.training.checkpoint import snapshot

    folder = snapshot(args.run, out=args.out)
    print(f"wrote the checkpoint as a student folder: {folder}")
    return 0


def _load_family(args):
    """(teacher, family, student label) from --teacher/--student and plan/order flags."""
    from boomerang.family import Family
    from boomerang.student import Manifest, cut_student, family_order, open_family

    if args.student:
        args.student = _student_folder(args.student)
        opened = open_family(args.student, teacher=args.teacher, order=args.order, calibration=args.calibration,
                             ends=args.ends,
                             load=lambda source: _load_teacher(args, source))
        return opened.teacher, opened.family, str(opened.folder)
    teacher = _load_teacher(args)
    plan = _plan_from_args(args, teacher.n_layers)
    student = cut_student(teacher.model, plan, share=True)
    # the fresh student's manifest, unsaved: its orders resolve the way a student folder's do
    order = family_order(Manifest(teacher.source, teacher.fingerprint, plan), args.order, teacher, student,
                         args.calibration)
    return teacher, Family(teacher.model, student, plan, order=order, ends=args.ends), "(freshly cut, undistilled)"


# ----------------------------------------------------------------------------- commands


def cmd_family(args) -> int:
    from boomerang.family import compress_runs

    teacher, family, label = _load_family(args)
    sizes = family.sizes()
    if args.json:
        print(json.dumps({
            "teacher": teacher.source, "teacher_fingerprint": teacher.fingerprint, "student": label,
            "plan": family.plan.to_dict(), "alignment": [list(a) for a in family.plan.alignment],
            "order": list(family.order), "sizes": [s.to_dict() for s in sizes],
        }, indent=2))
        return 0
    plan = family.plan
    print(f"teacher  {teacher.source}  ({plan.n_teacher} layers, {family.arch.family})")
    print(f"student  {label}  ({plan.n_student} layers)")
    print(f"kept     {list(plan.kept)}")
    print(f"order    {list(family.order)}  (student layers, first patched first)\n")
    print(f"{'layers':>6}  {'params':>12}  {'no embed':>12}  {'patched':>7}  runs")
    for s in sizes:
        tag = " (teacher)" if s.is_teacher else " (student)" if s.is_student else ""
        print(f"{s.n_layers:>6}  {s.params:>12,}  {s.params_no_embed:>12,}  {len(s.patched):>7}  "
              f"{compress_runs(s.layers)}{tag}")
    return 0


def cmd_cut(args) -> int:
    from boomerang.outputs import check_output_dir
    from boomerang.student import Manifest, cut_student, save_student

    check_output_dir(args.out, overwrite=args.overwrite)  # fail before loading anything
    teacher = _load_teacher(args)
    plan = _plan_from_args(args, teacher.n_layers)
    student = cut_student(teacher.model, plan)
    manifest = Manifest(teacher.source, teacher.fingerprint, plan, teacher_revision=teacher.revision)
    out = save_student(student, teacher.tokenizer, manifest, args.out, overwrite=args.overwrite)
    print(f"wrote the {plan.n_student}-layer student (teacher layers {list(plan.kept)}) to {out}")
    return 0


def export_request_from_args(args):
    from boomerang.export import ExportRequest

    return ExportRequest(student=args.student, layers=args.layers, out=args.out, order=args.order, ends=args.ends,
                         overwrite=args.overwrite, teacher=getattr(args, "teacher", None))


def _add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True)
    p.add_argument("--layers", type=int, required=True, help="the size, by its number of layers")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")


def cmd_export(args) -> int:
    from boomerang.export import run_export

    req = export_request_from_args(args)
    out = run_export(req, device=args.device, dtype=args.dtype, calibration=args.calibration,
                     teacher=_load_teacher(args) if args.teacher else None)
    params = json.loads((out / "boomerang-size.json").read_text())["params"]
    print(f"exported the {req.layers}-layer size ({params:,} parameters) to {out}")
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from boomerang.generation import Sampling

    sampling = Sampling(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_p)  # checked first
    if not args.prompt.strip():
        raise BoomerangError("the prompt is empty: give --prompt TEXT")
    teacher, family, _ = _load_family(args)
    n_layers = args.layers or family.plan.n_teacher
    model = family.build(n_layers)
    tok = teacher.tokenizer
    if tok.chat_template and not args.no_chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(model.device)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                             streamer=streamer, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             **sampling.generate_kwargs())
    new = out.shape[1] - ids.shape[1]
    took = time.perf_counter() - start
    print(f"[{n_layers} layers: {new} tokens in {took:.2f} s, {new / took:.1f} tokens/s]", file=sys.stderr)
    return 0


def _plan_of(folder: str):
    """The plan of a run folder (its plan.json) or of a student folder (its manifest)."""
    from boomerang.student import read_manifest
    from boomerang.training.checkpoint import PLAN, read_plan

    if (Path(folder).expanduser() / PLAN).is_file():
        return read_plan(Path(folder).expanduser())
    return read_manifest(folder).plan


def distill_config_from_args(args, *, default_recipe: str = "auto"):
    """DistillConfig from a named recipe or a --recipe file (or the run's own recipe with --resume) < flags.

    Without --recipe, `default_recipe` decides: "auto" takes the CPU recipe when the run's device is
    a CPU and the paper's otherwise (a queued job passes "paper": the worker's device is not known here).
    """
    import dataclasses

    from boomerang.models import resolve_device
    from boomerang.plan import parse_layer_list
    from boomerang.training.recipe import DistillConfig, read_recipe, recipe_changes, recipe_settings

    names = {f.name for f in dataclasses.fields(DistillConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "keep" in given:
        given["keep"] = parse_layer_list(given["keep"])
    if getattr(args, "keep_from", None):
        if "keep" in given:
            raise BoomerangError("give --keep or --keep-from, not both")
        given["keep"] = list(_plan_of(args.keep_from).kept)
    if getattr(args, "resume", False):
        if "out" not in given:
            raise BoomerangError("--resume needs --out: the run folder to continue")
        cfg = DistillConfig.from_dict({**read_recipe(given["out"]).to_dict(), **given})
        if getattr(args, "recipe", None):  # the launcher passes the run's own recipe: only a different one is refused
            changed = recipe_changes(DistillConfig.from_dict({**recipe_settings(args.recipe), **given}).to_dict(),
                                     cfg.to_dict())
            if changed:
                raise BoomerangError(f"--recipe {args.recipe} differs from the run's recipe in {changed}; a run resumes "
                                     "with its own recipe: leave --recipe out")
        return cfg
    recipe = getattr(args, "recipe", None) or default_recipe
    if recipe == "auto":
        recipe = "cpu" if resolve_device(given.get("device", "auto")).type == "cpu" else "paper"
    return DistillConfig.from_dict({**recipe_settings(recipe), **given})


def cmd_distill(args) -> int:
    from boomerang.training.parallel import launch_processes

    cfg = distill_config_from_args(args)
    if os.environ.get("RANK", "0") == "0" and "WORLD_SIZE" not in os.environ:
        cfg.check()  # the teacher's config, the plan, the context length, the data: before any weight is loaded
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(cfg, resume=args.resume, stop_file=args.stop_file)
    result = _run_distill(cfg, resume=args.resume, stop_file=args.stop_file)
    if result is None or result.stopped:
        return 0
    print(f"student written to {result.student_dir} ({result.steps_done} steps)")
    print(f"its family: boomerang family --student {result.student_dir}")
    if cfg.evaluate:
        from boomerang.evaluation.run import EvalRequest
        from boomerang.models import resolve_device

        print("evaluating the family (the standard evaluation; --no-evaluate skips it)")
        request = EvalRequest.after_distillation(str(result.student_dir), device=str(resolve_device(cfg.device)))
        _run_eval(request)
    return 0


def _run_distill(cfg, *, resume: bool, stop_file: str | None = None):
    """One distillation in this process with a progress bar, Ctrl-C stopping after the step; the result (None on
    ranks other than 0)."""
    import signal

    from tqdm import tqdm

    from boomerang.training.loop import distill

    stop = {"asked": False}
    stop_file = Path(stop_file) if stop_file else None
    rank0 = os.environ.get("RANK", "0") == "0"

    def ask_stop(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        bar.write("stopping after this step (Ctrl-C again to abort without a checkpoint)...")

    bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, desc="distill", disable=not rank0)
    previous = signal.signal(signal.SIGINT, ask_stop)

    def on_step(r):
        terms = " ".join(f"{name} {value:.3f}" for name, value in r.terms.items())
        bar.set_postfix_str(f"loss {r.loss:.3f} {terms} lr {r.lr:.1e} {r.tokens_per_s:,.0f} tok/s", refresh=False)
        bar.update(r.step - bar.n)  # a resumed run starts past 0

    def should_stop() -> bool:
        return stop["asked"] or bool(stop_file and stop_file.exists())

    shown = {"at": 0.0}

    def on_phase(p):  # before the first step: what is happening, n/N, rate, ETA (every 2 s and at each end)
        if p.done in (0, p.total) or time.monotonic() - shown["at"] > 2:
            bar.write(p.text())
            shown["at"] = time.monotonic()

    try:
        result = distill(cfg, on_step=on_step, should_stop=should_stop, resume=resume, on_phase=on_phase)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if not rank0:
        return None
    if result.stopped:
        print(f"stopped at step {result.steps_done}/{cfg.steps}; checkpoint saved. "
              f"Continue with: boomerang distill --out {result.out} --resume")
    return result


def cmd_baselines(args) -> int:
    from boomerang.training.at_size import at_size_configs, is_done

    configs = at_size_configs(args.student, args.sizes, order=args.order)
    for cfg in configs:
        cfg.check()  # every one before the first starts
    for k, cfg in enumerate(configs, start=1):
        out = Path(cfg.out)
        n = len(cfg.keep)
        if is_done(cfg):
            print(f"[{k}/{len(configs)}] {n} layers: already distilled ({out / 'student'})")
            continue
        print(f"[{k}/{len(configs)}] distilling a {n}-layer student (teacher layers {cfg.keep}) into {out}")
        result = _run_distill(cfg, resume=(out / "recipe.json").is_file())
        if result is None or result.stopped:
            print("stopped: run boomerang baselines again to continue where it stopped")
            return 0
    print(f"done: boomerang eval {args.student} puts them beside the family (series 'distilled')")
    return 0


def cmd_heldout(args) -> int:
    from boomerang import data as d
    from boomerang.evaluation.metrics import family_label_free

    if args.tokens < 2:
        raise BoomerangError(f"--tokens must be at least 2 (one prediction needs two tokens), got {args.tokens}")
    if not 0 < args.heldout_fraction < 1:
        raise BoomerangError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
    teacher, family, label = _load_family(args)
    held = d.heldout_blocks(args.data, teacher.tokenizer, args.tokens, seq_len=args.seq_len,
                            fraction=args.heldout_fraction)
    if not args.json:
        print(f"student {label}; {held.numel():,} held-out tokens from the end of {args.data}")
        print(f"{'layers':>6} {'params':>12} {'perplexity':>11} {'KL':>8} {'top-1':>7}")

    def show(r):
        if not args.json:
            print(f"{r.n_layers:>6} {family.info(r.n_layers).params:>12,} {r.perplexity:>11.2f} "
                  f"{r.kl_to_teacher:>8.4f} {r.top1_agreement:>7.3f}", flush=True)

    results = family_label_free(family, held, batch_size=args.batch_size, on_size=show)
    if args.json:
        print(json.dumps({"student": label, "data": args.data, "tokens": int(held.numel()),
                          "sizes": [r.to_dict() for r in results]}, indent=2))
    return 0


def eval_request_from_args(args):
    from boomerang.evaluation.metrics import EvalSettings
    from boomerang.evaluation.run import EvalRequest

    from boomerang.student import at_size_students

    student = _student_folder(str(Path(args.student).expanduser()))
    distilled = args.distilled if args.distilled is not None else [str(p) for p in at_size_students(student)]
    common = dict(distilled=distilled, teacher=args.teacher, order=args.order, ends=args.ends, calibration=args.calibration,
                  data_dir=args.data_dir, sizes=args.sizes,
                  references=args.reference, heldout_tokens=args.heldout_tokens,
                  settings=EvalSettings(args.num_fewshot, args.limit, args.batch_size, args.seed),
                  out=args.out, chart_metric=args.chart_metric, device=args.device, dtype=args.dtype)
    asked = dict(tasks=[t for t in args.tasks.split(",") if t], baselines=[b for b in args.baselines.split(",") if b],
                 heldout_data=args.heldout_data, general_data=args.general_data, cost=args.cost)
    if not any(asked.values()):  # nothing named: the standard evaluation (shipped tasks, held-out, cost, baselines)
        return EvalRequest.standard(student, **common)
    return EvalRequest(student=student, **asked, **common)


def cmd_eval(args) -> int:
    request = eval_request_from_args(args)
    request.check()  # the student, the task files line by line, the held-out file: before any model is loaded
    return _run_eval(request)


def _run_eval(request) -> int:
    from tqdm import tqdm

    from boomerang.evaluation.run import evaluate_student

    bar = tqdm(unit="cell", desc="eval", dynamic_ncols=True)

    def on_cell(done, total, key, task, skipped):
        bar.total = total
        bar.set_postfix_str(f"{key} {task}{' (cached)' if skipped else ''}", refresh=False)
        bar.update(1)

    try:
        report = evaluate_student(request, on_cell=on_cell)
    finally:
        bar.close()
    print(f"{report.computed} cells computed, {report.total - report.computed} already on disk; table {report.table}")
    for path in report.charts:
        print(f"chart {path}")
    return 0


def cmd_teacher(args) -> int:
    start = time.perf_counter()
    teacher = _load_teacher(args)
    from boomerang.arch import adapter_for

    cfg = teacher.model.config
    info = {"source": teacher.source, "family": adapter_for(cfg).family, "model_type": cfg.model_type,
            "layers": teacher.n_layers, "hidden_size": cfg.hidden_size,
            "parameters": sum(p.numel() for p in teacher.model.parameters()),
            "fingerprint": teacher.fingerprint, "revision": teacher.revision,
            "load_seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>12}  {v:,}" if isinstance(v, int) else f"{k:>12}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
