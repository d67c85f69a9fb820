"""Print the evaluation of a family (the eval command's family.csv) as markdown tables.

    python docs/recipes/summarize_eval.py RESULTS_DIR/family.csv
"""

import csv
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
by_model = defaultdict(dict)
info = {}
for r in rows:
    by_model[r["key"]][(r["task"], r["metric"])] = float(r["value"])
    info[r["key"]] = (r["series"], int(r["n_layers"]), int(r["params"]))
lm_tasks = sorted({r["task"] for r in rows if r["task"] not in ("heldout", "cost")})
order = {"student": 0, "interpolated": 1, "teacher": 2, "undistilled": 3, "drop-bi": 4, "reference": 5}
keys = sorted(by_model, key=lambda k: (order.get(info[k][0], 9), info[k][1]))
head = ["model", "layers", "params (M)", "held-out ppl", "KL", "top-1"] + lm_tasks + ["mean acc", "prefill ms", "decode tok/s"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for k in keys:
    m, (series, n, p) = by_model[k], info[k]
    accs = [m.get((t, "acc")) for t in lm_tasks]
    mean = sum(a for a in accs if a is not None) / len([a for a in accs if a is not None]) if any(a is not None for a in accs) else None
    cells = [k, str(n), f"{p / 1e6:.1f}", f"{m.get(('heldout', 'perplexity'), float('nan')):,.1f}",
             f"{m.get(('heldout', 'kl_to_teacher'), float('nan')):.3f}", f"{m.get(('heldout', 'top1_agreement'), float('nan')):.3f}"]
    cells += ["-" if a is None else f"{a:.2f}" for a in accs]
    cells += ["-" if mean is None else f"{mean:.3f}", f"{m.get(('cost', 'prefill_ms'), float('nan')):.0f}",
              f"{m.get(('cost', 'decode_tokens_per_s'), float('nan')):.1f}"]
    print("| " + " | ".join(cells) + " |")
