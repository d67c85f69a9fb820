"""Print `boomerang compare`'s at-size.csv as one markdown table per text and metric: a row per family (a budget of
docs/recipes/budget_sweep.sh, a recipe), a column per size with a student distilled at it, each cell the interpolated
size's value against the distilled student's, how far apart (relative) and which is better beyond two standard
errors (D: the distilled student, I: the interpolated size, =: within noise).

    python docs/recipes/summarize_gaps.py COMPARE_DIR/at-size.csv [METRIC ...]     (default: kl_to_teacher)
"""

import csv
import sys
from collections import defaultdict

path, metrics = sys.argv[1], sys.argv[2:] or ["kl_to_teacher"]
rows = [r for r in csv.DictReader(open(path)) if r["metric"] in metrics]
mark = {"distilled": "D", "interpolated": "I", "within noise": "="}
tables = defaultdict(lambda: defaultdict(dict))
for r in rows:
    tables[(r["task"], r["metric"])][r["family"]][int(r["n_layers"])] = r
for (task, metric), families in sorted(tables.items()):
    sizes = sorted({n for cells in families.values() for n in cells})
    print(f"\n{task} {metric}: interpolated vs distilled at the size (relative gap, winner)\n")
    print("| family | " + " | ".join(f"{n} layers" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for family, cells in families.items():
        out = []
        for n in sizes:
            r = cells.get(n)
            out.append("-" if r is None else f"{float(r['interpolated']):.3f} vs {float(r['distilled']):.3f} "
                       f"({float(r['relative'] or 'nan'):+.0%} {mark[r['winner']]})")
        print(f"| {family} | " + " | ".join(out) + " |")
