"""Print `boomerang compare`'s families.csv as one markdown table per family: every size's parameters,
perplexity on the run's held-out split and on general text, KL and top-1 on general text, each marked F when
it is on the Pareto frontier of everything compared (for that text and metric).

    python docs/recipes/summarize_fidelity.py COMPARE_DIR/families.csv
"""

import csv
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
cols = [("heldout", "perplexity", "held-out ppl", "{:,.1f}"), ("general", "perplexity", "general ppl", "{:,.1f}"),
        ("general", "kl_to_teacher", "general KL", "{:.3f}"), ("general", "top1_agreement", "general top-1", "{:.3f}")]
by_model, info = defaultdict(dict), {}
for r in rows:
    by_model[r["key"]][(r["task"], r["metric"])] = (float(r["value"]), r["pareto"])
    info[r["key"]] = (r["family"], r["series"], int(r["n_layers"]), int(r["params"]))
order = {"student": 0, "interpolated": 1, "teacher": 2, "distilled": 3, "undistilled": 4, "drop-bi": 5, "reference": 6}
families = sorted({f for f, *_ in info.values()})
for family in families:
    keys = sorted((k for k in by_model if info[k][0] == family), key=lambda k: (order.get(info[k][1], 9), info[k][2]))
    print(f"\n### {family or 'shared'}\n")
    print("| model | layers | params (M) | " + " | ".join(c[2] for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for k in keys:
        cells = []
        for task, metric, _, fmt in cols:
            value, pareto = by_model[k].get((task, metric), (None, ""))
            cells.append("-" if value is None else fmt.format(value) + (" F" if pareto == "frontier" else ""))
        print(f"| {k.split(':')[-1]} | {info[k][2]} | {info[k][3] / 1e6:.1f} | " + " | ".join(cells) + " |")
front = defaultdict(list)
for k, m in by_model.items():
    for (task, metric), (_, pareto) in m.items():
        if pareto == "frontier":
            front[(task, metric)].append((info[k][3], k))
print()
for (task, metric), keys in sorted(front.items()):
    print(f"- frontier of {task} {metric}: " + ", ".join(k for _, k in sorted(keys)))
