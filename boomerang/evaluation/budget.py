"""What each model cost to make, and the family against students distilled at its sizes at equal *total* budget.

An interpolated size costs nothing of its own: every size of a family comes from the family's one run, so each
carries that run's training tokens, shared by all of them. A student distilled at a size (`boomerang baselines`)
carries its own; the baselines that drop layers (`undistilled`, `drop-bi`) cost no training, and the teacher's
pretraining is not counted. The equal-total-budget question: to have models at K sizes, is it better to distill
the family once, or K students with 1/K of its budget each (`baselines --split`, the `split` series)?
"""

from __future__ import annotations

import json
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.evaluation import chart
from boomerang.student import at_size_students, read_manifest, split_of
from boomerang.training.checkpoint import METRICS

COST_FIELDS = ("train_tokens", "train_seconds", "paid_by")
"""The row fields `training_costs` fills: tokens and wall-clock seconds of the run that made the model, and which
run paid for them (a family's sizes share one)."""
UNTRAINED = ("undistilled", "drop-bi")


def training_of(folder: str | Path) -> dict | None:
    """{"tokens", "steps", "seconds"} of a student folder this tool distilled (its manifest, and the run's
    `metrics.jsonl` for the wall time: the sum over the sessions of a resumed run), else None."""
    folder = Path(folder).expanduser()
    try:
        summary = read_manifest(folder).distilled
    except BoomerangError:
        return None
    if not summary or "tokens" not in summary:
        return None
    seconds = None
    log = folder.parent / METRICS
    if log.is_file():
        seconds, last = 0.0, 0.0
        for line in log.read_text().splitlines():
            try:
                elapsed = float(json.loads(line)["elapsed_s"])
            except (ValueError, KeyError, TypeError):
                continue
            if elapsed < last:  # a resumed session starts its clock again
                seconds += last
            last = elapsed
        seconds += last
    return {"tokens": int(summary["tokens"]), "steps": int(summary.get("steps", 0)), "seconds": seconds}


def training_costs(student: str | Path) -> dict[str, dict]:
    """{model key: {train_tokens, train_seconds, paid_by}} for the models of a family's evaluation: its sizes (the
    family's run, "family"), students distilled at its sizes ("own"), baselines that drop layers (0, "none")."""
    family = training_of(student)
    out: dict[str, dict] = {}
    if family:
        out["family"] = {"train_tokens": family["tokens"], "train_seconds": family["seconds"], "paid_by": "family"}
    for folder in at_size_students(student):
        own = training_of(folder)
        if own:
            n = read_manifest(folder).plan.n_student
            k = split_of(folder)
            key = f"distilled-{n}" if k is None else f"split{k}-{n}"
            out[key] = {"train_tokens": own["tokens"], "train_seconds": own["seconds"], "paid_by": "own"}
    return out


def with_costs(rows: list[dict], costs: dict[str, dict]) -> list[dict]:
    """`rows` with COST_FIELDS filled from `training_costs` (blank where unknown: the teacher, a reference)."""
    out = []
    for r in rows:
        key = r["key"].split(":")[-1]
        if r["series"] in ("interpolated", "student"):
            c = costs.get("family")
        elif r["series"] in UNTRAINED:
            c = {"train_tokens": 0, "train_seconds": 0.0, "paid_by": "none"}
        else:
            c = costs.get(key)
        out.append({**r, **(c or dict.fromkeys(COST_FIELDS, ""))})
    return out


def equal_budget(pts: list[dict], metric: str) -> list[dict]:
    """Size by size, the family's size against the student distilled at it with 1/K of the family's budget
    (`split`): `chart.at_size_gaps` of the `split` series, with each side's total tokens (the family's one run;
    the K split students' together) when the points carry them."""
    pairs = chart.at_size_gaps(pts, metric, series="split")
    totals = budget_totals(pts)
    for g in pairs:
        g["family_tokens"], g["split_tokens"] = totals.get((g["family"], "family")), totals.get((g["family"], "split"))
    return pairs


def budget_totals(pts: list[dict]) -> dict[tuple[str, str], int]:
    """{(family, option): training tokens to have the models at every size measured}: "family" (its one run),
    "split" and "distilled" (the sum over their students)."""
    out: dict[tuple[str, str], int] = {}
    for p in pts:
        tokens = p.get("train_tokens")
        if tokens in (None, ""):
            continue
        fam = chart.at_size_of(p.get("family") or "") or p.get("family") or ""
        if p["series"] in ("interpolated", "student"):
            out[(fam, "family")] = int(tokens)
        elif p["series"] in ("split", "distilled"):
            out[(fam, p["series"])] = out.get((fam, p["series"]), 0) + int(tokens)
    return out


def budget_line(gap: dict, metric: str) -> str:
    """One sentence for an `equal_budget` pair."""
    where = f"{gap['family']} at {gap['n_layers']} layers" if gap["family"] else f"{gap['n_layers']} layers"
    rel = f"{gap['relative']:+.0%}" if gap["relative"] is not None else f"{gap['difference']:+.4g}"
    noise = f", {abs(gap['difference']) / gap['stderr']:.1f} standard errors" if gap["stderr"] else ""
    spent = ""
    if gap.get("family_tokens") and gap.get("split_tokens"):
        spent = f" (family {gap['family_tokens']:,} tokens for every size; split students {gap['split_tokens']:,} together)"
    verdict = {"distilled": "the split student is better", "interpolated": "the family's size is better"}.get(
        gap["winner"], "within noise of each other")
    return (f"{where}: {metric} family {gap['interpolated']:.4g}, split student {gap['distilled']:.4g} "
            f"({rel}{noise}){spent}: {verdict}")


def figure(pts: list[dict], task: str, metric: str):
    """Quality against the *total* training tokens spent to have models at these sizes: per size, the family's
    point (its one run) beside the split students' (their sum) and the students distilled with the family's budget
    each (their sum); None when no family has students to compare with."""
    import plotly.graph_objects as go  # only when a chart is drawn

    totals = budget_totals(pts)
    options = (("family", ("interpolated", "student")), ("split", ("split",)), ("distilled", ("distilled",)))
    fig, drawn = go.Figure(), False
    by_size: dict[tuple[str, int], list[tuple[int, float, str]]] = {}
    for p in pts:
        fam = chart.at_size_of(p.get("family") or "") or p.get("family") or ""
        for option, series in options:
            if p["series"] in series and (fam, option) in totals:
                by_size.setdefault((fam, p["n_layers"]), []).append((totals[(fam, option)], p["value"], option))
    for (fam, n), marks in sorted(by_size.items()):
        if len({m[2] for m in marks}) < 2:
            continue  # a size nothing else was made at
        marks.sort()
        drawn = True
        fig.add_trace(go.Scatter(x=[m[0] for m in marks], y=[m[1] for m in marks], mode="lines+markers",
                                 name=f"{fam + ' · ' if fam else ''}{n} layers", text=[m[2] for m in marks],
                                 marker={"symbol": [{"family": "circle", "split": "square"}.get(m[2], "diamond")
                                                    for m in marks], "size": 9},
                                 hovertemplate="%{text}: %{x:,} tokens in all<br>" + metric + " %{y:.4f}<extra></extra>"))
    if not drawn:
        return None
    fig.update_layout(title=f"{task}: {metric} vs. total training tokens to have these sizes (circle: the family, "
                            "square: split students, diamond: a full budget each)",
                      xaxis_title="training tokens, all sizes together", yaxis_title=metric, template="plotly_white",
                      legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(type="log")
    return fig
