"""The standard evaluation's models scored on an lm-eval task two ways, side by side in one process: one model at a
time with lm-eval's own Hugging Face model (how every cell was scored before), and as the evaluation now scores
them: the family's sizes as one group, the baselines (undistilled, drop-bi) as another (`boomerang.evaluation.shared`:
each shared layer once per batch, the output head only where a request scores). Asserts that every model gets the
same accuracy and the same per-item log-likelihoods either way (within 1e-4 nats: the bfloat16 head runs on fewer
rows) and prints the ratio.

    python bench/bench_eval.py --student DIR [--task arc_easy_mini] [--limit 100] [--dtype auto] [--alone]

--alone adds a third way, the scorer one model at a time: the ratio of the head alone, apart from the sharing.
"""

from __future__ import annotations

import argparse
import time

import torch

from boomerang.evaluation import run as evalrun
from boomerang.evaluation import task_files
from boomerang.evaluation.chart import FAMILY_SERIES
from boomerang.evaluation.metrics import EvalSettings, lm_eval_task, metrics_of, run_lm_eval
from boomerang.evaluation.shared import SharedScorer, shared_lm
from boomerang.student import calibration_ids, open_family


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True, help="a distilled student folder (its family in the best order)")
    p.add_argument("--task", default="arc_easy_mini")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--alone", action="store_true", help="also the scorer one model at a time")
    args = p.parse_args()
    opened = open_family(args.student, dtype=args.dtype)
    family, tok = opened.family, opened.teacher.tokenizer
    cal = calibration_ids(tok, None, evalrun.CALIBRATION_TOKENS)
    cands = evalrun.family_candidates(family, None) + evalrun.baseline_candidates(family, ["undistilled", "drop-bi"], None, cal)
    models = {c.entry.key: c.build() for c in cands}
    groups = [[c.entry.key for c in cands if (c.entry.series in FAMILY_SERIES) == fam] for fam in (True, False)]
    spec = task_files.resolve([args.task], None)[0]
    settings = EvalSettings(limit=args.limit)
    dtype = str(next(opened.teacher.model.parameters()).dtype)
    print(f"torch threads {torch.get_num_threads()}; {len(models)} models ({len(groups[0])} of the family, "
          f"{len(groups[1])} baselines), {args.task} at {args.limit} items, {dtype}")

    def lm_eval_own(key):
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained=models[key], tokenizer=tok, batch_size=settings.batch_size, softmax_dtype=torch.float32)
        return run_lm_eval(lm, spec, settings)

    ways = {"lm-eval, one at a time": lambda: {k: lm_eval_own(k) for k in models}}
    if args.alone:
        ways["scorer, one at a time"] = lambda: {k: lm_eval_task(models[k], tok, spec, settings) for k in models}
    ways["scorer, in two groups"] = lambda: _grouped(models, groups, tok, spec, settings)
    results, seconds = {}, {}
    for name, way in ways.items():
        start = time.perf_counter()
        results[name] = way()
        seconds[name] = time.perf_counter() - start
    _check(results)
    base = seconds["lm-eval, one at a time"]
    for name, s in seconds.items():
        print(f"  {name:24s} {s:7.1f} s   {base / s:.2f}x")
    plan = [SharedScorer({k: models[k] for k in g}).plan for g in groups]
    print(f"layer calls per batch: {sum(q.layers_alone for q in plan)} one at a time, {sum(q.layers_run for q in plan)} "
          f"in groups ({' and '.join(f'{q.layers_alone}/{q.layers_run}' for q in plan)}); same numbers every way")


def _grouped(models, groups, tok, spec, settings) -> dict:
    out = {}
    for keys in groups:
        scorer = SharedScorer({k: models[k] for k in keys}, batch_size=settings.batch_size)
        for k in keys:
            out[k] = run_lm_eval(shared_lm(scorer, k, tok, batch_size=settings.batch_size), spec, settings)
    return out


def _check(results: dict) -> None:
    first, *others = results.values()
    for other in others:
        for key, r in first.items():
            a, b = metrics_of(r), metrics_of(other[key])
            assert a["acc"] == b["acc"], f"{key}: accuracy {a['acc']} != {b['acc']}"
            for x, y in zip(r["items"], other[key]["items"], strict=True):
                assert max(abs(u - v) for u, v in zip(x["ll"], y["ll"], strict=True)) <= 2e-4, f"{key}: log-likelihoods differ"


if __name__ == "__main__":
    main()
