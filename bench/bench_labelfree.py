"""Label-free metrics of a whole family, two ways side by side: one model at a time (the teacher runs again for
each model) and together (`label_free_many`: the teacher once per batch for all). Same numbers either way.

    python bench/bench_labelfree.py [--teacher default] [--tokens 1024] [--sizes 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from boomerang.evaluation.metrics import label_free, label_free_many
from boomerang.family import Family
from boomerang.models import load_teacher
from boomerang.plan import LayerPlan
from boomerang.student import calibration_ids, cut_student


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", default="default")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--sizes", type=int, default=8, help="models measured (the family's smallest sizes)")
    args = p.parse_args()
    teacher = load_teacher(args.teacher)
    plan = LayerPlan.from_rule(teacher.n_layers)
    fam = Family(teacher.model, cut_student(teacher.model, plan, share=True), plan)
    models = {n: fam.build(n) for n in fam.layer_counts[: args.sizes]}
    ids = calibration_ids(teacher.tokenizer, None, 10**6)
    text = ids.repeat(1, args.tokens // ids.shape[1] + 1)[:, : args.tokens]
    blocks = text.view(-1, 128)
    print(f"torch threads {torch.get_num_threads()}; {len(models)} models of {teacher.source}, "
          f"{blocks.numel()} tokens in blocks of 128")
    start = time.perf_counter()
    alone = {n: label_free(m, teacher.model, blocks, n_layers=n) for n, m in models.items()}
    t_alone = time.perf_counter() - start
    start = time.perf_counter()
    together = label_free_many(models, teacher.model, blocks, n_layers={n: n for n in models})
    t_together = time.perf_counter() - start
    assert together == alone, "the two ways disagree"
    print(f"one at a time: {t_alone:.1f} s   together: {t_together:.1f} s   {t_alone / t_together:.2f}x faster, "
          "the same numbers")


if __name__ == "__main__":
    main()
