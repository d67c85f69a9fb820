"""The size-vs-score chart: one series per kind of model, the Pareto frontier marked (dominated
points hollow).

`points(rows, task, metric)` picks one value per model (task "average" averages the metric over every
task the model has, keeping only models that have them all); `figure(...)` draws it with plotly;
`save(...)` writes HTML (plotly) and PNG (matplotlib, which needs no browser).
"""

from __future__ import annotations

from pathlib import Path

LOWER_IS_BETTER = {"perplexity", "kl_to_teacher", "word_perplexity", "byte_perplexity", "bits_per_byte",
                   "prefill_ms", "weights_mb", "peak_mb"}
LOG_Y = {"perplexity", "word_perplexity", "byte_perplexity"}  # spans orders of magnitude across baselines
COLORS = {"interpolated": "#1f77b4", "teacher": "#d62728", "student": "#2ca02c", "undistilled": "#7f7f7f",
          "drop-bi": "#ff7f0e", "reference": "#9467bd", "distilled": "#8c564b", "split": "#e377c2"}


LABEL_FREE = ("heldout", "general")
"""Label-free tasks: the training text's held-out split, and text of another domain."""
LABEL_FREE_METRICS = ("perplexity", "kl_to_teacher", "top1_agreement")
NOT_AVERAGED = (*LABEL_FREE, "cost")
"""Tasks that are not accuracy benchmarks: the label-free texts and cost."""


def measurement(cell: str) -> str:
    """How a cell was measured (task, items, few-shot, seed, held-out text), from its file name
    "TASK.MEASUREMENT[@VARIANT].json": the variant (a family's patch order and ends) left out."""
    return (cell or "").removesuffix(".json").split("@")[0]


def one_measurement(rows: list[dict], task: str, metric: str) -> tuple[list[dict], int]:
    """The rows of one task and metric measured one way, and how many rows of other ways were left out.

    Numbers measured with other settings (limit, few-shot, held-out text) do not compare: the measurement that
    covers the most models is kept (on a tie, the one measured last). Within one family, one cell per model: the
    variant (patch order, ends) that covers the most of its models, then the latest; families (`combine`)
    each bring theirs, so variants from different folders share a chart."""
    mine = [r for r in rows if r["task"] == task and r["metric"] == metric]
    last = {}
    for i, r in enumerate(mine):
        last[r.get("cell") or ""] = i
    by_measure: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for r in mine:
        cell = r.get("cell") or ""
        by_measure.setdefault(measurement(cell), {}).setdefault(r.get("family") or "", {}).setdefault(cell, []).append(r)

    def pick(cells: dict[str, list[dict]]) -> list[dict]:
        return cells[max(cells, key=lambda c: (len({r["key"] for r in cells[c]}), last[c]))]

    chosen = {m: [r for cells in fams.values() for r in pick(cells)] for m, fams in by_measure.items()}
    if not chosen:
        return [], 0
    newest = {m: max(last[r.get("cell") or ""] for r in rs) for m, rs in chosen.items()}
    best = max(chosen, key=lambda m: (len({r["key"] for r in chosen[m]}), newest[m]))
    return [dict(r) for r in chosen[best]], len(mine) - len(chosen[best])


def points(rows: list[dict], task: str, metric: str) -> list[dict]:
    """One point per model: its entry fields plus `value` (and `stderr` for a single task); each task as
    measured one way (see `one_measurement`)."""
    if task != "average":
        return one_measurement(rows, task, metric)[0]
    tasks = {r["task"] for r in rows if r["metric"] == metric and r["task"] not in NOT_AVERAGED}
    kept = [r for t in sorted(tasks) for r in one_measurement(rows, t, metric)[0]]
    by_model: dict[str, list[dict]] = {}
    for r in kept:
        if r["metric"] == metric and r["task"] in tasks:
            by_model.setdefault(r["key"], []).append(r)
    out = []
    for group in by_model.values():
        if len({r["task"] for r in group}) == len(tasks):
            errs = [r.get("stderr") for r in group]
            known = [e for e in errs if e is not None]
            stderr = (sum(e * e for e in known) ** 0.5 / len(errs)) if len(known) == len(errs) else None
            out.append({**group[0], "task": "average", "value": sum(r["value"] for r in group) / len(group),
                        "stderr": stderr})  # tasks' items independent: the mean's variance is the mean of theirs / k
    return out


X_AXES = ("parameters", "parameters without embeddings", "decode latency (ms/token)", "prefill latency (ms)",
          "memory (MB)")
"""What a chart's x axis (and "fit my budget") measures a model by: its size, or its cost as measured (the cost
cells: decode and prefill latency at batch 1, weights in memory)."""
_COST_AXES = {"decode latency (ms/token)": ("decode_tokens_per_s", lambda v: 1000.0 / v if v else None),
              "prefill latency (ms)": ("prefill_ms", lambda v: v), "memory (MB)": ("weights_mb", lambda v: v)}


def x_of(rows: list[dict], axis: str) -> dict[str, float]:
    """{model key: its x} on `axis` (X_AXES); models lacking it (no cost cell, a row without the count) are left out."""
    if axis == "parameters":
        return {r["key"]: r["params"] for r in rows}
    if axis == "parameters without embeddings":
        return {r["key"]: int(r["params_no_embed"]) for r in rows if r.get("params_no_embed") not in (None, "")}
    if axis not in _COST_AXES:
        raise ValueError(f"unknown x axis {axis!r}: one of {', '.join(X_AXES)}")
    metric, convert = _COST_AXES[axis]
    measured = one_measurement(rows, "cost", metric)[0]
    out = {r["key"]: convert(r["value"]) for r in measured if r["value"] == r["value"]}  # NaN: not measured
    return {k: v for k, v in out.items() if v is not None}


def on_axis(pts: list[dict], rows: list[dict], axis: str) -> tuple[list[dict], int]:
    """`pts` with `x` set from `axis` (see `x_of`), and how many points were left out for lack of it."""
    xs = x_of(rows, axis)
    kept = [{**p, "x": xs[p["key"]]} for p in pts if p["key"] in xs]
    return kept, len(pts) - len(kept)


def _x(p: dict) -> float:
    return p.get("x", p["params"])


CHANCE_METRICS = ("acc", "acc_norm")


def chance_normalised(rows: list[dict]) -> list[dict]:
    """Accuracy rows rescaled so that 0 is chance and 1 is every item right: (acc - c) / (1 - c), c the mean of
    1 / choices over the task's items (kept with each cell: `provenance`); its standard error scaled alike. Other
    metrics pass unchanged; accuracy rows whose chance is unknown (measured before it was kept) are left out."""
    out = []
    for r in rows:
        if r["metric"] not in CHANCE_METRICS:
            out.append(r)
            continue
        made = r.get("provenance") or (r.get("settings") or {}).get("provenance") or {}
        c = made.get("chance")
        if not isinstance(c, (int, float)) or not 0 <= c < 1:
            continue
        out.append({**r, "value": (r["value"] - c) / (1 - c),
                    "stderr": None if r.get("stderr") is None else r["stderr"] / (1 - c)})
    return out


FAMILY_SERIES = ("teacher", "student", "interpolated")
"""A family's own models (the rest of a chart's points are baselines and other families)."""


def most_telling(rows: list[dict]) -> tuple[str, str, float] | None:
    """(task, metric, signal-to-noise) of the measurement that tells the family's own models apart best: the spread
    of their values in units of their median standard error (zero errors, as the teacher's KL to itself, left out).
    None when no measurement of at least three of them has standard errors."""
    best = None
    tasks = sorted({r["task"] for r in rows if r["task"] != "cost"})
    lm_tasks = [t for t in tasks if t not in NOT_AVERAGED]
    for task in tasks + (["average"] if len(lm_tasks) > 1 else []):
        for metric in sorted({r["metric"] for r in rows if r["task"] in (lm_tasks if task == "average" else [task])}):
            pts = [p for p in points(rows, task, metric) if p["series"] in FAMILY_SERIES]
            errs = sorted(p["stderr"] for p in pts if p.get("stderr"))
            if len(pts) < 3 or not errs:
                continue
            spread = max(p["value"] for p in pts) - min(p["value"] for p in pts)
            snr = spread / errs[len(errs) // 2]
            if best is None or snr > best[2]:
                best = (task, metric, snr)
    return best


def noise_note(pts: list[dict]) -> str:
    """One sentence on how large a difference has to be before it means anything; "" without stderrs."""
    errs = sorted(p["stderr"] for p in pts if p.get("stderr"))
    if not errs:
        return ""
    typical = errs[len(errs) // 2]
    # two models each with standard error s differ by more than 2 * sqrt(2) * s about 1 time in 20 by chance
    return (f"Error bars are ±1 standard error (typically {typical:.3f} here): two models closer than about "
            f"{2 * 2 ** 0.5 * typical:.3f} are within noise of each other.")


def pareto(pts: list[dict], higher_is_better: bool = True) -> list[dict]:
    """Points no other point beats with fewer or equal parameters (or less of the point's `x`: see `on_axis`)."""
    best, frontier = None, []
    for p in sorted(pts, key=lambda p: (_x(p), -p["value"] if higher_is_better else p["value"])):
        if best is None or (p["value"] > best if higher_is_better else p["value"] < best):
            frontier.append(p)
            best = p["value"]
    return frontier


def dominated_by(pts: list[dict], higher_is_better: bool = True) -> dict[str, str | None]:
    """For each point's key: the key of the smallest model with no more parameters that scores better
    (the reason it is not worth deploying), or None for points on the Pareto frontier."""
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    out = {}
    for p in pts:
        rivals = [q for q in pts if _x(q) <= _x(p) and better(q["value"], p["value"])]
        out[p["key"]] = min(rivals, key=lambda q: (_x(q), q["key"]))["key"] if rivals else None
    return out


def figure(pts: list[dict], task: str, metric: str, *, log_x: bool = False, highlight: str | None = None,
           x_axis: str = "parameters"):
    """The chart of `points` (with `x` from `on_axis` when `x_axis` is not parameters)."""
    import plotly.graph_objects as go  # only when a chart is drawn

    fig = go.Figure()
    _draw(fig, pts, metric, x_axis=x_axis, highlight=highlight)
    fig.update_layout(title=f"{task}: {metric} vs. {x_axis}", xaxis_title=x_axis, yaxis_title=metric,
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(type="log" if log_x else "linear")
    fig.update_yaxes(type="log" if metric in LOG_Y else "linear")
    return fig


def panels(rows: list[dict], metric: str, *, x_axis: str = "parameters", log_x: bool = False):
    """The average beside one panel per task (the accuracy tasks, `metric` on each), on one x axis."""
    from plotly.subplots import make_subplots  # only when a chart is drawn

    tasks = sorted({r["task"] for r in rows if r["metric"] == metric and r["task"] not in NOT_AVERAGED})
    names = (["average"] if len(tasks) > 1 else []) + tasks
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=True)
    for col, task in enumerate(names, start=1):
        pts = points(rows, task, metric)
        if x_axis != "parameters":
            pts = on_axis(pts, rows, x_axis)[0]
        _draw(fig, pts, metric, x_axis=x_axis, col=col, legend=col == 1)
        fig.update_xaxes(title_text=x_axis, type="log" if log_x else "linear", row=1, col=col)
    fig.update_layout(title=f"{metric} per task vs. {x_axis}", yaxis_title=metric, template="plotly_white",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def _draw(fig, pts: list[dict], metric: str, *, x_axis: str = "parameters", highlight: str | None = None,
          col: int | None = None, legend: bool = True) -> None:
    import plotly.graph_objects as go  # only when a chart is drawn

    higher = metric not in LOWER_IS_BETTER
    beaten = dominated_by(pts, higher)
    where = {"row": 1, "col": col} if col else {}
    x_fmt = "%{x:,} params" if x_axis == "parameters" else f"{x_axis} " + "%{x:,.4g}"
    families = _families(pts)
    for (series, family), group in _groups(pts):
        symbol = SYMBOLS[families.index(family) % len(SYMBOLS)]
        fig.add_trace(go.Scatter(
            x=[_x(p) for p in group], y=[p["value"] for p in group],
            name=f"{series} · {family}" if family else series, legendgroup=f"{series}{family}", showlegend=legend,
            mode="lines+markers" if len(group) > 1 else "markers",
            # hollow: dominated (a model with no more parameters scores better), filled: on the frontier
            marker={"color": COLORS[series], "size": 9 if series in ("teacher", "student") else 7,
                    "symbol": [f"{symbol}-open" if beaten.get(p["key"]) else symbol for p in group]},
            error_y={"type": "data", "array": [p.get("stderr") or 0 for p in group],
                     "visible": any(p.get("stderr") is not None for p in group)},
            customdata=[[p["key"], p["n_layers"], p.get("blocks", ""),
                         f"dominated by {beaten[p['key']]}" if beaten.get(p["key"]) else "on the Pareto frontier"]
                        for p in group],
            hovertemplate="%{customdata[0]}<br>%{customdata[1]} layers, " + x_fmt + "<br>"
                          f"{metric}: " + "%{y:.4f}<br>%{customdata[3]}<br>%{customdata[2]}<extra></extra>",
        ), **where)
    front = pareto(pts, higher)
    if front:
        fig.add_trace(go.Scatter(x=[_x(p) for p in front], y=[p["value"] for p in front], name="Pareto frontier",
                                 mode="lines", line={"dash": "dot", "color": "black", "width": 1}, hoverinfo="skip",
                                 legendgroup="pareto", showlegend=legend), **where)
    if highlight:
        chosen = [p for p in pts if p["key"] == highlight]
        fig.add_trace(go.Scatter(x=[_x(p) for p in chosen], y=[p["value"] for p in chosen], name="fits the budget",
                                 mode="markers", marker={"symbol": "star", "size": 18, "color": "gold",
                                                         "line": {"color": "black", "width": 1}}), **where)


SYMBOLS = ("circle", "square", "diamond", "triangle-up", "pentagon", "hexagon")
"""Marker per family when several families share a chart (`combine`); color says the series."""


def _families(pts: list[dict]) -> list[str]:
    return sorted({p.get("family") or "" for p in pts})


def _groups(pts: list[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    """Points by (series, family), series in COLORS order, each group by parameters."""
    out, families = [], _families(pts)
    for series in COLORS:
        for family in families:
            group = sorted((p for p in pts if p["series"] == series and (p.get("family") or "") == family),
                           key=_x)
            if group:
                out.append(((series, family), group))
    return out


SHARED_BASELINES = ("drop-bi", "distilled", "split", "reference")
"""Series whose models do not depend on the family they were evaluated with (see `combine`)."""


AT_SIZE_SUFFIX = "-at-size"
"""A family named NAME-at-size holds students distilled at sizes of the family NAME whose run folder was gone
(`docs/recipes/at_size_only.sh`): `at_size_gaps` pairs them with NAME's sizes. A later batch of them, whose
evaluation folder cannot share the name of a family already in a table, is NAME-at-size-TAG (paper-4x-at-size-23)."""


def at_size_of(family: str) -> str | None:
    """NAME for a family named NAME-at-size or NAME-at-size-TAG (see AT_SIZE_SUFFIX), else None."""
    head, sep, tail = family.rpartition(AT_SIZE_SUFFIX)
    return head if sep and head and (not tail or tail.startswith("-")) else None


def at_size_gaps(pts: list[dict], metric: str, *, series: str = "distilled") -> list[dict]:
    """The paper's central comparison, size by size: every interpolated size beside the student distilled at that
    size (series `distilled`, same layer count, same family or else NAME-at-size[-TAG]), from `points`.

    One dict per pair, by family then size: family, n_layers, interpolated and distilled (values), difference
    (interpolated - distilled), stderr of the difference (the two standard errors as independent, which overstates
    it for models scored on the same text: the verdict errs towards "within noise"; None when either lacks one),
    relative (difference / distilled) and winner: "distilled" or "interpolated" when the difference is over twice
    its standard error (or, without standard errors, when it is not zero), else "within noise". `series="split"`:
    the students distilled with a split of the family's budget instead (see `budget.equal_budget`)."""
    higher = metric not in LOWER_IS_BETTER
    # a family's own student distilled at a size wins over NAME-at-size's at the same size (sorted to come last)
    distilled = {(at_size_of(p.get("family") or "") or p.get("family") or "", p["n_layers"]): p
                 for p in sorted((p for p in pts if p["series"] == series),
                                 key=lambda p: at_size_of(p.get("family") or "") is None)}
    out = []
    for p in sorted((p for p in pts if p["series"] == "interpolated"), key=lambda p: (p.get("family") or "", p["n_layers"])):
        q = distilled.get((p.get("family") or "", p["n_layers"]))
        if q is None:
            continue
        diff = p["value"] - q["value"]
        a, b = p.get("stderr"), q.get("stderr")
        stderr = (a ** 2 + b ** 2) ** 0.5 if a is not None and b is not None else None
        beyond = abs(diff) > 2 * stderr if stderr is not None else diff != 0
        better = "interpolated" if (diff > 0) == higher else "distilled"
        out.append({"family": p.get("family") or "", "n_layers": p["n_layers"], "interpolated": p["value"],
                    "distilled": q["value"], "difference": diff, "stderr": stderr,
                    "relative": diff / q["value"] if q["value"] else None,
                    "winner": better if beyond else "within noise"})
    return out


def gap_line(gap: dict, metric: str) -> str:
    """One sentence for an `at_size_gaps` pair: "cpu-4x at 20 layers: kl_to_teacher interpolated 0.6456, distilled at
    the size 0.5558 (+16%, 3.6 standard errors): the student distilled at the size is better"."""
    where = f"{gap['family']} at {gap['n_layers']} layers" if gap["family"] else f"{gap['n_layers']} layers"
    rel = f"{gap['relative']:+.0%}" if gap["relative"] is not None else f"{gap['difference']:+.4g}"
    noise = f", {abs(gap['difference']) / gap['stderr']:.1f} standard errors" if gap["stderr"] else ""
    verdict = {"distilled": "the student distilled at the size is better",
               "interpolated": "the interpolated size is better"}.get(gap["winner"], "within noise of each other")
    return (f"{where}: {metric} interpolated {gap['interpolated']:.4g}, distilled at the size {gap['distilled']:.4g} "
            f"({rel}{noise}): {verdict}")


def combine(families: dict[str, list[dict]]) -> list[dict]:
    """Rows of several families of one teacher (name -> rows) as one set: each row gets `family` and a key unique
    across them ("NAME:interpolated-23"); the teacher, measured alike in every family, is kept once (no family).
    `points` then keeps each task measured one way (families evaluated on other held-out texts are left out of
    that task's chart), and one Pareto frontier runs over every series of every family. A baseline that does not
    depend on the family (a drop-bi model, a student distilled at a size, a reference) found in several families
    with the same value on the same text is one model measured again (an ends variant of a run, two runs on one
    corpus): it is kept once, under the first family that has it."""
    out: list[dict] = []
    seen: set[tuple] = set()
    for name, rows in families.items():
        for r in rows:
            if r["series"] == "teacher":
                ident: tuple = (r["key"], r["task"], r["metric"], r.get("cell"))
                if ident in seen:
                    continue
                seen.add(ident)
                out.append({**r, "family": ""})
                continue
            if r["series"] in SHARED_BASELINES:
                ident = (r["key"], r["params"], r["task"], r["metric"], measurement(r.get("cell") or ""), r["value"])
                if ident in seen:
                    continue
                seen.add(ident)
            out.append({**r, "family": name, "key": f"{name}:{r['key']}"})
    return out


def save(pts: list[dict], task: str, metric: str, out_dir: str | Path, *, log_x: bool = False,
         x_axis: str = "parameters") -> tuple[Path, Path]:
    """Write `<task>-<metric>.html` (interactive) and `.png` (static) into `out_dir` (points with `x` from `on_axis`
    when `x_axis` is not parameters)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{task}-{metric}"
    figure(pts, task, metric, log_x=log_x, x_axis=x_axis).write_html(f"{stem}.html", include_plotlyjs="cdn")
    _png(pts, task, metric, f"{stem}.png", log_x, x_axis)
    return Path(f"{stem}.html"), Path(f"{stem}.png")


def _png(pts: list[dict], task: str, metric: str, path: str, log_x: bool, x_axis: str = "parameters") -> None:
    import matplotlib  # only for the PNG charts

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only for the PNG charts

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    scale = 1e6 if x_axis.startswith("parameters") else 1.0
    marks, families = "osD^ph", _families(pts)
    for (series, family), group in _groups(pts):
        mark = marks[families.index(family) % len(marks)]
        ax.errorbar([_x(p) / scale for p in group], [p["value"] for p in group],
                    yerr=[p.get("stderr") or 0 for p in group], fmt=f"{mark}-" if len(group) > 1 else mark,
                    color=COLORS[series], label=f"{series} · {family}" if family else series, markersize=5,
                    capsize=2, elinewidth=0.8)
    front = pareto(pts, metric not in LOWER_IS_BETTER)
    if front:
        ax.plot([_x(p) / scale for p in front], [p["value"] for p in front], ":", color="black", label="Pareto frontier")
    if log_x:
        ax.set_xscale("log")
    if metric in LOG_Y:
        ax.set_yscale("log")
    ax.set_xlabel(f"{x_axis} (millions)" if scale > 1 else x_axis), ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} vs. {x_axis}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
