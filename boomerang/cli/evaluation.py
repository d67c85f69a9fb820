"""`boomerang heldout | eval | compare`: measuring a family, label-free or with lm-eval, and families side by side."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from tqdm import tqdm

from boomerang import data as d
from boomerang.cli.flags import RequestCommand, add_family_flags, add_remote_code, load_family
from boomerang.cli.flags import student_folder as as_student_folder
from boomerang.errors import BoomerangError
from boomerang.evaluation import items
from boomerang.evaluation.budget import budget_line
from boomerang.evaluation.chart import NOT_AVERAGED, X_AXES, gap_line
from boomerang.evaluation.compare import compare_families, is_table, results_of
from boomerang.evaluation.metrics import EvalSettings, family_label_free
from boomerang.evaluation.run import EvalRequest, evaluate_student
from boomerang.settings import add_flags, values_from_args

STANDARD = ("Naming none of --tasks, --baselines, --heldout-data, --general-data, --cost asks for the standard "
            "evaluation: the shipped tasks, the run's own held-out text, the shipped general text, cost, both "
            "baselines and the students distilled at sizes of the family.")


def register(sub) -> None:
    p = sub.add_parser("heldout", help="held-out perplexity, KL to the teacher and top-1 agreement of every size")
    add_family_flags(p)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student)")
    p.add_argument("--data", required=True, help="text file or folder; its last --heldout-fraction is used")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to measure (default 4096)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_heldout)

    p = sub.add_parser("eval", help="evaluate every size (lm-eval, held-out text, cost) beside baselines; resumable",
                       description=STANDARD)
    add_eval_flags(p)
    add_remote_code(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="several evaluated families of one teacher on one chart, one Pareto frontier "
                       "over every series of every family")
    p.add_argument("families", nargs="+", help="student folders (their eval/) or results folders; also an earlier "
                   "comparison's families.csv (PATH.csv, or PATH.csv:NAME,NAME for some of its families)")
    p.add_argument("--name", action="append", default=None,
                   help="a name per folder, in order (default: its run folder; a table's families keep theirs)")
    p.add_argument("--out", required=True, help="folder for families.csv and charts/")
    p.add_argument("--chart-metric", default="acc", help="metric of the task charts (default acc)")
    p.add_argument("--x-axis", default="parameters", choices=X_AXES, help="what the charts' x axis (and Pareto "
                   "frontiers) measure a model by: its size, or its measured cost (default parameters)")
    p.add_argument("--chance-normalised", action="store_true", help="accuracy charts rescaled so 0 is guessing "
                   "(1 / choices) and 1 every item right")
    p.add_argument("--items", nargs=2, metavar=("A", "B"), default=None,
                   help="what model A gets right that B does not, item by item, in one family's results (model keys as "
                   "in family.csv, e.g. interpolated-23 teacher-30): counts, McNemar's exact test, the items they "
                   "disagree on, and items-A-B-TASK.csv in --out")
    p.add_argument("--task", default=None, help="with --items: the task (default: every lm-eval task both have)")
    p.set_defaults(func=cmd_compare)


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """EvalRequest's fields (its lm-eval settings flattened in): the student positional, the rest flags."""
    add_flags(p, EvalRequest, positional=("student",), aliases={"references": "--reference"})


def eval_request_from_args(args) -> EvalRequest:
    given = values_from_args(args, EvalRequest)
    given["student"] = as_student_folder(str(Path(args.student).expanduser()))
    if "settings" in given:  # the lm-eval flags given, over EvalSettings' defaults
        given["settings"] = EvalSettings.from_dict(given["settings"])
    return EvalRequest.asked(**given)


REQUEST_COMMANDS = {"eval": RequestCommand(add_eval_flags, eval_request_from_args)}


def cmd_heldout(args) -> int:
    if args.tokens < 2:
        raise BoomerangError(f"--tokens must be at least 2 (one prediction needs two tokens), got {args.tokens}")
    if not 0 < args.heldout_fraction < 1:
        raise BoomerangError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
    teacher, family, label = load_family(args)
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


def cmd_eval(args) -> int:
    request = eval_request_from_args(args)
    if request.parts > 1:
        raise BoomerangError(f"--parts {request.parts} shares out a queued evaluation over workers: "
                             f"`boomerang submit eval ... --parts {request.parts}`. In one process, run each part with "
                             "--part I/N (on machines that share the results folder), then once without to gather them")
    request.check()  # the student, the task files line by line, the held-out file: before any model is loaded
    return run_eval(request)


def run_eval(request: EvalRequest) -> int:
    """One evaluation in this process, with a progress bar of its cells."""
    bar = tqdm(unit="cell", desc="eval", dynamic_ncols=True)

    def on_cell(done, total, key, task, skipped):
        bar.total = total
        bar.set_postfix_str(f"{key} {task}{' (cached)' if skipped else ''}", refresh=False)
        bar.update(1)

    def on_rows(rows):  # what is there so far, as each cell lands (the table and charts come at the end)
        for line in partial_lines(rows):
            bar.write(line)

    try:
        report = evaluate_student(request, on_cell=on_cell, on_rows=on_rows)
    finally:
        bar.close()
    done = f"{report.computed} cells computed, {report.total - report.computed} already on disk"
    if report.table is None:
        print(f"{done} (part {request.part}: run the same command without --part to gather the parts, measure cost "
              "and write the table)")
        return 0
    print(f"{done}; table {report.table}")
    for path in report.charts:
        print(f"chart {path}")
    return 0


HEADLINE = ("acc", "kl_to_teacher", "perplexity", "top1_agreement", "decode_ms_per_token")
"""The metrics a landed cell prints while an evaluation runs, in this order (those it has)."""


def partial_lines(rows: list[dict]) -> list[str]:
    """One line per (model, task) of a cell that has just landed: its headline metrics with standard errors."""
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["key"], r["task"]), []).append(r)
    out = []
    for (key, task), mine in by_cell.items():
        values = {r["metric"]: r for r in mine}
        shown = [m for m in HEADLINE if m in values] or sorted(values)[:3]
        parts = [f"{m} {values[m]['value']:.4g}" + (f" ± {values[m]['stderr']:.2g}" if values[m].get("stderr") else "")
                 for m in shown]
        out.append(f"partial: {key} {task}: {', '.join(parts)}")
    return out


def cmd_compare(args) -> int:
    if args.items:
        return compare_items(args)
    report = compare_families(args.families, args.out, names=args.name, chart_metric=args.chart_metric,
                              x_axis=args.x_axis, chance=args.chance_normalised)
    for (task, metric), keys in report.frontiers.items():
        print(f"{task} {metric}: Pareto frontier {', '.join(keys)}")
    for (task, metric), pairs in report.gaps.items():  # the paper's central comparison, size by size
        for g in pairs:
            print(f"{task} at-size {gap_line(g, metric)}")
        won = {w: sum(g["winner"] == w for g in pairs) for w in ("distilled", "interpolated", "within noise")}
        print(f"{task} {metric}: of {len(pairs)} sizes with a student distilled at the size, the distilled student is "
              f"better at {won['distilled']}, the interpolated size at {won['interpolated']}, "
              f"{won['within noise']} within noise")
    for (task, metric), pairs in report.budget.items():  # the family against students that split its budget
        for g in pairs:
            print(f"{task} equal-budget {budget_line(g, metric)}")
        won = {w: sum(g["winner"] == w for g in pairs) for w in ("distilled", "interpolated", "within noise")}
        print(f"{task} {metric}: at equal total budget, of {len(pairs)} sizes the family's is better at "
              f"{won['interpolated']}, the split student at {won['distilled']}, {won['within noise']} within noise")
    print(f"table {report.table}")
    if report.gaps:
        print(f"table {report.table.with_name('at-size.csv')}")
    if report.budget:
        print(f"table {report.table.with_name('equal-budget.csv')}")
    for path in report.charts:
        print(f"chart {path}")
    return 0


ITEM_FIELDS = ["id", "right", "gold", "pick_a", "pick_b", "prompt", "choices", "ll_a", "ll_b"]
SHOWN_ITEMS = 10
"""Items printed per task where the two models disagree (every item goes to the CSV)."""


def compare_items(args) -> int:
    if len(args.families) != 1 or is_table(args.families[0]):
        raise BoomerangError("--items compares two models of one family's results: name one student or results folder")
    results = results_of(args.families[0])
    a, b = args.items
    metric = args.chart_metric
    tasks = [args.task] if args.task else sorted(
        {p.name.split(".")[0] for p in (results / "cells" / a).glob("*.json")}
        & {p.name.split(".")[0] for p in (results / "cells" / b).glob("*.json")} - set(NOT_AVERAGED))
    if not tasks:
        raise BoomerangError(f"{a} and {b} share no lm-eval task in {results} (model keys as in family.csv)")
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        result = items.pair(items.read_items(items.cell_of(results, a, task)),
                            items.read_items(items.cell_of(results, b, task)), metric)
        print(f"{task} {metric}: {items.summary(result, a, b)}")
        differ = [r for r in result["rows"] if r["right"] in ("only_a", "only_b")]
        for r in differ[:SHOWN_ITEMS]:
            who = a if r["right"] == "only_a" else b
            print(f"  item {r['id']}: only {who} right (gold {r['gold']}; {a} picked {r['pick_a']}, {b} {r['pick_b']}): "
                  f"{r['prompt'][-100:]!r}")
        if len(differ) > SHOWN_ITEMS:
            print(f"  ... {len(differ) - SHOWN_ITEMS} more")
        path = out / f"items-{a}-{b}-{task}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ITEM_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**r, "choices": json.dumps(r["choices"]), "ll_a": json.dumps(r["ll_a"]),
                              "ll_b": json.dumps(r["ll_b"])} for r in result["rows"])
        print(f"table {path}")
    return 0
