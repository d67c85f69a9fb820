"""The distilled-at-size baseline: a student cut to one size of a family and distilled with the family's own
recipe, data and token budget, so the interpolated size can be put beside what the same budget buys at that
size directly (the paper's central comparison).

Its plan is the one the family's size implies: each layer of the size is a teacher layer (a patched block's
layers, or the teacher layer a student layer was cut from), so both models run the same teacher layers' places.
Its run folder is `RUN/at-size/N/` beside the family's `student/`; an evaluation of the family finds the finished
ones and draws them as the `distilled` series.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.plan import LayerPlan, parse_layer_list
from boomerang.student import AT_SIZE, MANIFEST, SPLIT, named_schedule, read_manifest
from boomerang.training.checkpoint import STUDENT
from boomerang.training.recipe import DistillConfig, read_recipe


def implied_keep(plan: LayerPlan, patched: set[int]) -> list[int]:
    """The teacher layers a size (these student layers patched) runs or was cut from, one per layer it runs."""
    return [i if who == "teacher" else plan.kept[i] for who, i in plan.layers_after_patching(patched)]


def is_done(cfg: DistillConfig) -> bool:
    """Whether the distillation of this config has written its student."""
    return (Path(cfg.out) / STUDENT / MANIFEST).is_file()


def default_sizes(counts: list[int]) -> list[int]:
    """Three sizes spread over the family, student and teacher excluded (fewer when it has fewer)."""
    inner = counts[1:-1]
    picks = [inner[(len(inner) * k) // 4] for k in (1, 2, 3)] if len(inner) >= 3 else inner
    return sorted(set(picks))


def at_size_configs(student: str | Path, sizes: str | list[int] | None = None, *,
                    order: str = "best", split: bool = False) -> list[DistillConfig]:
    """One distillation per size, as the family's run was made (recipe, data, steps, batch, seed), with the plan
    the size implies and every step on that one size (no mixed sizes: the baseline is the best model of that size
    the budget buys).

    The size is the one the family uses: in its best measured order by default (last-k for a folder whose best
    order was never measured). With `split`, the family's budget is split between the K sizes (each gets 1/K of
    its steps, rounded): the students together cost what the family cost, the equal-total-budget comparison. They
    go to `RUN/at-size/splitK/N/` (see `split_students`)."""

    folder = Path(student).expanduser().resolve()
    manifest = read_manifest(folder)
    if not manifest.distilled or not manifest.distilled.get("recipe"):
        raise BoomerangError(f"{folder} was not distilled by this tool (its manifest names no recipe): a baseline "
                             "distilled at a size needs the family's own recipe")
    run = Path(manifest.distilled["recipe"]).parent
    if not run.is_dir():
        run = folder.parent  # a run folder moved as a whole
    recipe = read_recipe(run)
    if order == "best" and manifest.best is None:
        order = "last"
    schedule = named_schedule(manifest, order)
    counts = sorted(schedule)
    wanted = default_sizes(counts) if sizes in (None, "", "default") else (
        parse_layer_list(sizes) if isinstance(sizes, str) else list(sizes))
    inner = counts[1:-1]
    bad = [n for n in wanted if n not in inner]
    if bad:
        raise BoomerangError(f"no size with {bad[0]} layers between this family's student and teacher: its sizes are "
                             f"{', '.join(map(str, inner))}")
    configs = []
    steps = max(1, round(recipe.steps / len(wanted))) if split else recipe.steps
    root = folder.parent / AT_SIZE / (f"{SPLIT}{len(wanted)}" if split else "")
    for n in wanted:
        keep = implied_keep(manifest.plan, set(schedule[n]))
        configs.append(dataclasses.replace(recipe, keep=keep, plan="rule", mix_prob=0.0, evaluate=False, steps=steps,
                                           out=str(root / str(n))))
    return configs
