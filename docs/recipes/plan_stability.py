"""How stable is the importance plan? The `cpu` recipe keeps the layers whose removal costs the teacher most,
measured on the run's first 8 training blocks (128 tokens each, drawn by the seed). This measures that choice on
several corpora and seeds and prints how often each teacher layer is kept.

Usage: .venv/bin/python docs/recipes/plan_stability.py [--seeds 3] CORPUS [CORPUS ...]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from boomerang import data as d
from boomerang.importance import drop_one_costs
from boomerang.models import load_teacher
from boomerang.plan import importance_plan
from boomerang.training.loop import IMPORTANCE_BLOCKS
from boomerang.training.recipe import DistillConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("corpora", nargs="+")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    teacher = load_teacher("default")
    cfg = DistillConfig.from_dict({"teacher": "default"})
    rule = cfg.plan_for(teacher.n_layers)
    plans = {}
    for corpus, seed in itertools.product(args.corpora, range(args.seeds)):
        start = time.perf_counter()
        stream = d.pack(d.read_documents(corpus), teacher.tokenizer, 128)
        train, held = d.split_blocks(stream, 128, 0.1, corpus)
        ids = d.TokenData(train, held, corpus).batch(0, IMPORTANCE_BLOCKS, seed)
        with torch.no_grad():
            costs = drop_one_costs(teacher.model, ids)
        plan = importance_plan(costs, rule.n_student, keep_first=cfg.keep_first, keep_last=cfg.keep_last,
                               max_run=cfg.every)
        dropped = sorted(set(range(teacher.n_layers)) - set(plan.kept))
        plans[(Path(corpus).stem, seed)] = set(dropped)
        print(f"{Path(corpus).stem:<40} seed {seed}: dropped {dropped}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n{len(plans)} plans, {len({frozenset(v) for v in plans.values()})} distinct "
          f"({rule.n_teacher - rule.n_student} layers dropped of {rule.n_teacher})")
    counts = {i: sum(i in v for v in plans.values()) for i in range(teacher.n_layers)}
    always = [i for i, c in counts.items() if c == len(plans)]
    never = [i for i, c in counts.items() if c == 0]
    sometimes = {i: c for i, c in counts.items() if 0 < c < len(plans)}
    print(f"dropped in every plan: {always}\nkept in every plan:    {never}")
    print("dropped in some plans (layer: how many of " + str(len(plans)) + "): "
          + ", ".join(f"{i}: {c}" for i, c in sometimes.items()))
    pairs = list(itertools.combinations(plans.values(), 2))
    same = sum(len(a & b) for a, b in pairs) / max(1, len(pairs))
    print(f"two plans share on average {same:.1f} of their {rule.n_teacher - rule.n_student} dropped layers")


if __name__ == "__main__":
    main()
