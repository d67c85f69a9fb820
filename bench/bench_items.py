"""What keeping every scored item costs an lm-eval cell (the item-by-item view): one shipped task on one size of the
default teacher's family, lm-eval run without and with its per-sample log, alternately, the same scores either way.

    python bench/bench_items.py [--teacher default] [--task arc_easy_mini] [--limit 100] [--repeats 3] [--layers 23]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lm_eval.models.huggingface import HFLM

from boomerang.evaluation import task_files
from boomerang.evaluation.metrics import EvalSettings, run_lm_eval
from boomerang.family import Family
from boomerang.models import load_teacher
from boomerang.plan import LayerPlan
from boomerang.student import cut_student


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", default="default")
    p.add_argument("--task", default="arc_easy_mini")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="the size measured (default: the family's middle one)")
    args = p.parse_args()
    teacher = load_teacher(args.teacher)
    plan = LayerPlan.from_rule(teacher.n_layers)
    fam = Family(teacher.model, cut_student(teacher.model, plan, share=True), plan)
    n = args.layers or fam.layer_counts[len(fam.layer_counts) // 2]
    lm = HFLM(pretrained=fam.build(n), tokenizer=teacher.tokenizer, batch_size=8)
    task = task_files.resolve([args.task], None)[0]
    settings = EvalSettings(limit=args.limit)
    run_lm_eval(lm, task, settings, keep_items=False)  # warm-up: lm-eval's imports, the task's first build
    seconds: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for _ in range(args.repeats):
        for keep in (False, True):
            start = time.perf_counter()
            out = run_lm_eval(lm, task, settings, keep_items=keep)
            seconds[keep].append(time.perf_counter() - start)
            results[keep] = out
    assert results[True]["results"] == results[False]["results"], "keeping items changed the scores"
    bare, kept = statistics.median(seconds[False]), statistics.median(seconds[True])
    size = len(json.dumps(results[True])) - len(json.dumps({k: v for k, v in results[True].items() if k != "items"}))
    print(f"{args.task}, {args.limit} items, {n} layers of {teacher.source}; median of {args.repeats}: "
          f"without items {bare:.2f} s, with items {kept:.2f} s, {kept / bare:.3f}x; the items add "
          f"{size / 1024:.0f} KiB to the cell")


if __name__ == "__main__":
    main()
