"""What a size loses, item by item: every scored item of an lm-eval cell (lm-eval's per-sample output, kept compact),
and two models set side by side on the same items, with an exact McNemar test of whether their difference is
beyond noise.

Two models scored on the same items are paired: their accuracies' standard errors, taken as independent, overstate
the noise of the difference. What matters is the items on which they disagree: b (only A right) and c (only B
right). Under "no difference" each disagreement goes either way with probability 1/2, so the two-sided p-value is
the binomial tail of min(b, c) in b + c trials, doubled (McNemar's exact test).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from boomerang.errors import BoomerangError

TEXT_CHARS = 400
"""Characters of an item's prompt kept in a cell (its end: the question comes last in a few-shot prompt)."""
CHOICE_CHARS = 120


def compact(samples: list[dict]) -> list[dict]:
    """lm-eval's per-sample records of one task as the cell keeps them: the item's id and a hash of its document,
    the prompt (its last TEXT_CHARS characters), the choices, the gold answer, each choice's log-likelihood and the
    item's metrics (acc, acc_norm: 0 or 1)."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        args = [(str(a[0]), str(a[1])) for a in s.get("arguments", []) if isinstance(a, (list, tuple)) and len(a) == 2]
        if len({c for c, _ in args}) <= 1:  # multiple choice: one context, a continuation per choice
            prompt, choices = (args[0][0][-TEXT_CHARS:] if args else ""), [x[:CHOICE_CHARS] for _, x in args]
        else:  # partial scoring: a context per choice, one continuation
            prompt, choices = args[0][1][:TEXT_CHARS], [c[-CHOICE_CHARS:] for c, _ in args]
        resps = s.get("filtered_resps") or []
        ll = [round(float(r[0]), 4) if isinstance(r, (list, tuple)) else round(float(r), 4) for r in resps]
        out.append({"id": s["doc_id"], "doc": str(s.get("doc_hash", ""))[:12], "prompt": prompt,
                    "choices": choices, "chars": [len(x) for _, x in args], "gold": _plain(s.get("target")), "ll": ll,
                    "scores": {m: float(s[m]) for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}})
    return out


def _plain(value):
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def read_items(cell: str | Path) -> list[dict]:
    """The items of a cell file; a clear error for a cell measured before items were kept, or not an lm-eval task."""
    path = Path(cell)
    if not path.is_file():
        raise BoomerangError(f"no such evaluation cell: {path}")
    data = json.loads(path.read_text())
    if "items" not in data:
        raise BoomerangError(f"{path.name} of {path.parent.name} keeps no items: it was measured before items were "
                             "kept (evaluate the family again: such cells are measured again) or is not an lm-eval task")
    return data["items"]


def mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for b = `only_a`, c = `only_b` discordant items (1.0 when there are none)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def pick(item: dict, metric: str = "acc") -> int | None:
    """The choice a model picked: the highest log-likelihood (acc_norm: per character of the choice, as lm-eval)."""
    ll = item.get("ll") or []
    if len(ll) < 2:
        return None
    if metric == "acc_norm" and len(item.get("chars") or []) == len(ll):
        ll = [v / max(1, n) for v, n in zip(ll, item["chars"], strict=True)]
    return max(range(len(ll)), key=ll.__getitem__)


def pair(a: list[dict], b: list[dict], metric: str = "acc") -> dict:
    """Two models' items of one task side by side (matched by id; items whose documents differ are refused): the
    counts both / only_a / only_b / neither right, each model's accuracy on the shared items, the McNemar p-value,
    and `rows`, one per shared item (id, prompt, choices, gold, each model's pick and log-likelihoods, and which
    got it right)."""
    by_id = {i["id"]: i for i in b}
    shared = [(x, by_id[x["id"]]) for x in a if x["id"] in by_id]
    if not shared:
        raise BoomerangError("the two models share no scored item of this task")
    if any(x.get("doc") and y.get("doc") and x["doc"] != y["doc"] for x, y in shared):
        raise BoomerangError("the two cells scored different documents under the same ids (another version of the "
                             "task's file): compare cells measured on the same items")
    counts = {"both": 0, "only_a": 0, "only_b": 0, "neither": 0}
    rows = []
    for x, y in shared:
        ra, rb = _right(x, metric), _right(y, metric)
        if ra is None or rb is None:
            raise BoomerangError(f"metric {metric} is not scored item by item in this task (has: "
                                 f"{', '.join(sorted(x.get('scores', {}))) or 'none'})")
        which = "both" if ra and rb else "only_a" if ra else "only_b" if rb else "neither"
        counts[which] += 1
        rows.append({"id": x["id"], "prompt": x.get("prompt", ""), "choices": x.get("choices", []), "gold": x.get("gold"),
                     "pick_a": pick(x, metric), "pick_b": pick(y, metric), "ll_a": x.get("ll"), "ll_b": y.get("ll"),
                     "right": which})
    n = len(shared)
    return {**counts, "n": n, "acc_a": (counts["both"] + counts["only_a"]) / n,
            "acc_b": (counts["both"] + counts["only_b"]) / n,
            "p_value": mcnemar(counts["only_a"], counts["only_b"]), "rows": rows}


def _right(item: dict, metric: str) -> bool | None:
    score = item.get("scores", {}).get(metric)
    return None if score is None else score >= 0.5


def summary(result: dict, name_a: str, name_b: str) -> str:
    """One paragraph: the four counts, the accuracies and what the McNemar test says."""
    p = result["p_value"]
    verdict = ("beyond noise (p < 0.05)" if p < 0.05 else "within noise (p >= 0.05): the items they disagree on "
               "split about evenly")
    return (f"{result['n']} items: both right {result['both']}, only {name_a} {result['only_a']}, only {name_b} "
            f"{result['only_b']}, neither {result['neither']}. Accuracy {name_a} {result['acc_a']:.3f}, {name_b} "
            f"{result['acc_b']:.3f}. McNemar exact test on the {result['only_a'] + result['only_b']} items they "
            f"disagree on: p = {p:.3g}, {verdict}.")


def cell_of(results: str | Path, model_key: str, task: str, cell: str | None = None) -> Path:
    """A model's cell of a task in a results folder: `cell` (a file name) when given, else the newest one that keeps
    items."""
    folder = Path(results) / "cells" / model_key
    if cell:
        return folder / cell
    found = sorted(folder.glob(f"{task}.*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    with_items = [p for p in found if '"items"' in p.read_text()]
    if not found:
        raise BoomerangError(f"no {task} result for {model_key} in {results}: evaluate it first")
    if not with_items:
        raise BoomerangError(f"the {task} results of {model_key} keep no items: they were measured before items were "
                             "kept; evaluate the family again (such cells are measured again)")
    return with_items[0]
