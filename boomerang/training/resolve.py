"""The settings a run will use, resolved once for the CLI, the dashboard and queued jobs: a recipe (named,
or a file) under the settings given on top of it, a run's own recipe when it resumes, a pinned plan."""

from __future__ import annotations

from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.models import resolve_device
from boomerang.student import read_manifest
from boomerang.training.checkpoint import PLAN, read_plan
from boomerang.training.recipe import DistillConfig, named_recipe, read_recipe, recipe_changes, recipe_settings


def plan_of(folder: str):
    """The plan of a run folder (its plan.json) or of a student folder (its manifest)."""
    if (Path(folder).expanduser() / PLAN).is_file():
        return read_plan(Path(folder).expanduser())
    return read_manifest(folder).plan


def resolve_config(recipe: str | None, given: dict, *, resume: bool = False, keep_from: str | None = None,
                   default: str = "auto", named_only: bool = False) -> DistillConfig:
    """A run's full settings: `recipe`'s, then `given` over them (any DistillConfig fields).

    - `recipe` None takes `default`: "auto" is the CPU recipe when the run's device is a CPU and the paper's
      otherwise (a queued job passes "paper": the worker's device is not known where it is queued).
    - `named_only` refuses a recipe file (a dashboard does not read files it was not given).
    - `keep_from` pins an earlier run's plan (its run or student folder): its kept layers become `keep`.
    - `resume` continues the run in given["out"]: its own recipe under `given`; a `recipe` that differs
      from it is refused (a run resumes with its own recipe).
    """
    given = dict(given)
    if keep_from:
        if "keep" in given:
            raise BoomerangError("give --keep or --keep-from, not both")
        given["keep"] = list(plan_of(keep_from).kept)
    settings = named_recipe if named_only else recipe_settings
    if resume:
        if "out" not in given:
            raise BoomerangError("--resume needs --out: the run folder to continue")
        cfg = DistillConfig.from_dict({**read_recipe(given["out"]).to_dict(), **given})
        if recipe:  # the launcher passes the run's own recipe: only a different one is refused
            changed = recipe_changes(DistillConfig.from_dict({**settings(recipe), **given}).to_dict(), cfg.to_dict())
            if changed:
                raise BoomerangError(f"--recipe {recipe} differs from the run's recipe in {changed}; a run resumes "
                                     "with its own recipe: leave --recipe out")
        return cfg
    recipe = recipe or default
    if recipe == "auto":
        recipe = "cpu" if resolve_device(given.get("device", "auto")).type == "cpu" else "paper"
    return DistillConfig.from_dict({**settings(recipe), **given})
