"""A run folder's files, and checkpoints: everything needed to continue a run exactly where it stopped.

A run folder holds `recipe.json` (every setting), `plan.json` (the kept layers, however chosen),
`metrics.jsonl` (one line per step), `heldout-tokens.pt` (its held-out split), `checkpoint.pt` (written
atomically: a temporary file renamed over the last good one) and, at the end, `student/`. Any
checkpoint can be opened as a family before the end: `snapshot` writes it as a student folder under
`snapshots/step-N/`, which every command, the dashboard and the server open like the final one.

Checkpoints hold tensors and plain Python values only and are read with `weights_only=True`: a
crafted file in a shared run folder cannot run code in the process that resumes it.
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import torch

from boomerang.data import HELDOUT_FILE
from boomerang.errors import BoomerangError
from boomerang.models import load_teacher
from boomerang.plan import LayerPlan
from boomerang.student import MANIFEST, Manifest, cut_student, save_student
from boomerang.training.parallel import full_state, load_full_state, world
from boomerang.training.recipe import RECIPE, read_recipe, recipe_changes

METRICS, CHECKPOINT, STUDENT, PLAN, SNAPSHOTS = "metrics.jsonl", "checkpoint.pt", "student", "plan.json", "snapshots"
__all__ = ["RECIPE", "METRICS", "CHECKPOINT", "STUDENT", "PLAN", "SNAPSHOTS", "save_checkpoint", "load_checkpoint",
           "checkpoint_step", "truncate_metrics", "read_plan", "is_run_folder", "snapshot", "snapshots"]


def read_plan(out: str | Path):
    """The plan a run started with (its `plan.json`), however it was chosen."""

    saved = json.loads((Path(out) / PLAN).read_text())
    return LayerPlan(int(saved["n_teacher"]), tuple(saved["kept"]))


def is_run_folder(folder: str | Path) -> bool:
    """A distillation's run folder (not a student folder)."""

    folder = Path(folder).expanduser()
    return (folder / RECIPE).is_file() and not (folder / MANIFEST).is_file()


def snapshots(run_folder: str | Path) -> list[Path]:
    """The student folders `snapshot` wrote for a run, oldest step first."""

    found = Path(run_folder).expanduser().glob(f"{SNAPSHOTS}/step-*/{MANIFEST}")
    return sorted((p.parent for p in found), key=lambda p: int(p.name.removeprefix("step-")))


def snapshot(run_folder: str | Path, *, teacher=None, out: str | Path | None = None) -> Path:
    """The run's last checkpoint as a student folder (default `RUN/snapshots/step-N`), to evaluate, chat with,
    serve or export before the run ends; returns the folder. A snapshot already written for that step is
    returned as it is. `teacher`: the run's teacher already loaded (else loaded from its recipe)."""

    run = Path(run_folder).expanduser().resolve()
    if not is_run_folder(run):
        raise BoomerangError(f"{run_folder} is not a distillation's run folder (it has no {RECIPE})")
    if not (run / CHECKPOINT).is_file():
        raise BoomerangError(f"{run} has no checkpoint yet: the first is written after a few minutes of training "
                             f"(or every checkpoint_every steps)")
    step = checkpoint_step(run / CHECKPOINT)
    folder = Path(out).expanduser() if out else run / SNAPSHOTS / f"step-{step}"
    if (folder / MANIFEST).is_file():
        return folder
    if not out:
        folder.parent.mkdir(exist_ok=True)
    cfg = read_recipe(run)
    state = _read(run / CHECKPOINT, map_location="cpu")
    if teacher is None:
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device="cpu")
    plan = read_plan(run)
    student = cut_student(teacher.model, plan)
    student.load_state_dict(state["student"])
    tokens = step * cfg.batch_size * cfg.seq_len * cfg.grad_accum * cfg.world_size
    summary = {"steps": step, "of_steps": cfg.steps, "tokens": tokens, "checkpoint": True,
               "recipe": str(run / RECIPE)}
    manifest = Manifest(teacher.source, teacher.fingerprint, plan, teacher_revision=teacher.revision, distilled=summary)
    saved = save_student(student.eval(), teacher.tokenizer, manifest, folder, overwrite=True)
    if (run / HELDOUT_FILE).is_file():
        (saved / HELDOUT_FILE).write_bytes((run / HELDOUT_FILE).read_bytes())
    return saved


def save_checkpoint(run, step: int) -> Path | None:
    """Everything needed to continue: written (by rank 0) to a temporary file, then renamed over the last one.

    `run` is the loop's `Run`. A failed write (a full disk) removes its partial file and keeps the last
    good checkpoint.
    """
    student, optimizer = full_state(run.student, run.optimizer, run.sharded)
    if world()[0] != 0:
        return None
    state = {
        "step": step,
        "student": student,
        "optimizer": optimizer,
        "scheduler": run.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": run.cfg.to_dict(),
    }
    path = run.out / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc)
        reason = "no space left on the device" if full else str(exc).splitlines()[0][:200]
        kept = f"the checkpoint of an earlier step stays in {path}" if path.is_file() else "no earlier checkpoint exists"
        raise BoomerangError(f"could not write the checkpoint of step {step} ({reason}); freed the partial file, "
                             f"{kept}") from None
    return path


def load_checkpoint(run) -> None:
    """Restore `run` (student, optimizer, scheduler, random states, step) from its folder's checkpoint."""
    state = _read(run.out / CHECKPOINT, map_location="cpu" if run.sharded else run.device)
    changed = recipe_changes(state["config"], run.cfg.to_dict())
    if changed:
        raise BoomerangError(f"the recipe differs from the run's in {changed}; resume with the run's own recipe "
                             f"({run.out / RECIPE})")
    load_full_state(run.student, run.optimizer, state["student"], state["optimizer"], run.sharded)
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(_as_random_state(state["rng"]["python"]))
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.start_step = state["step"]
    if world()[0] == 0:
        truncate_metrics(run.out / METRICS, run.start_step)


def _as_random_state(value):
    """random.getstate() is nested tuples; a round trip may hand back lists."""
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _read(path: Path, map_location) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler raises several types for a file that is not a plain checkpoint
        raise BoomerangError(f"{path} is not a checkpoint this library wrote, or is damaged ({type(exc).__name__}); "
                             "it was not loaded (checkpoints are read as tensors and plain values only)") from None


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint file holds (read lazily: the weights are not loaded)."""
    try:
        return int(torch.load(path, mmap=True, map_location="cpu", weights_only=True)["step"])
    except Exception as exc:
        raise BoomerangError(f"{path} is not a checkpoint this library wrote, or is damaged ({type(exc).__name__})") from None


def truncate_metrics(path: Path, steps: int) -> None:
    """Keep the metric lines of the steps the checkpoint holds: a resumed step is logged once."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= steps]
    path.write_text("".join(kept))
