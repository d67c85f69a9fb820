"""`boomerang distill | baselines | snapshot`: training a family, students distilled at its sizes, and a running
run's checkpoint as a family."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from tqdm import tqdm

from boomerang.cli.evaluation import run_eval
from boomerang.cli.flags import RequestCommand
from boomerang.evaluation.run import EvalRequest
from boomerang.models import resolve_device
from boomerang.plan import parse_layer_list
from boomerang.settings import add_flags, values_from_args
from boomerang.training.at_size import at_size_configs, is_done
from boomerang.training.checkpoint import snapshot
from boomerang.training.loop import distill
from boomerang.training.memory import estimate_for
from boomerang.training.parallel import Rendezvous, launch_processes
from boomerang.training.recipe import DistillConfig
from boomerang.training.resolve import resolve_config


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill a student the boomerang way (resumable; Ctrl-C stops and checkpoints)")
    p.add_argument("--recipe", default=None,
                   help="paper | cpu | a JSON file whose keys are the settings below; default: cpu on a CPU, paper "
                        "on a GPU (docs/distillation.md says what each is)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-file", default=None,
                   help="stop after the current step, with a checkpoint, when this file appears (as Ctrl-C does)")
    p.add_argument("--estimate", action="store_true",
                   help="print the peak memory per device this run needs (teacher, student, gradients, optimizer, "
                        "activations, logits), whether it fits and what would make it fit; from the teacher's config "
                        "alone, nothing loaded or written")
    p.add_argument("--json", action="store_true", help="with --estimate: as JSON")
    machines = p.add_argument_group("a run over several machines (--nnodes N; docs/scale-out.md)")
    machines.add_argument("--node-rank", type=int, default=0, help="this machine's place, 0 to N-1 (node 0 hosts the "
                          "rendezvous and writes the outputs)")
    machines.add_argument("--rdzv", default=None, metavar="HOST:PORT", help="node 0's address and a free port, the same "
                          "on every machine")
    machines.add_argument("--rdzv-timeout", type=int, default=600, metavar="S",
                          help="seconds to wait for every machine to join (default 600)")
    add_config_flags(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("baselines", help="distill students at sizes of a family with its own recipe, data and budget "
                       "(the distilled-at-size baseline; resumable); eval then shows them beside the family")
    p.add_argument("student", help="the family's student folder (RUN/student)")
    p.add_argument("--sizes", default=None, help="comma-separated layer counts (default: three spread over the family)")
    p.add_argument("--order", default="best", help="the patch order whose sizes are meant (default: best, the "
                   "family's own)")
    p.add_argument("--split", action="store_true", help="split the family's budget between the sizes (each student "
                   "1/K of its steps for K sizes): the students together cost what the family cost, the equal-total-"
                   "budget comparison (RUN/at-size/splitK/N; eval shows them as the series 'split')")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("snapshot", help="a running or stopped distillation's last checkpoint as a student folder "
                       "(then eval, chat, serve or export it; eval, family, generate and heldout also take RUN itself)")
    p.add_argument("run", help="the distillation's run folder (its --out)")
    p.add_argument("--out", default=None, help="where to write it (default: RUN/snapshots/step-N)")
    p.set_defaults(func=cmd_snapshot)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field, help from its docstring; unset flags leave the recipe's value."""
    p.add_argument("--keep-from", default=argparse.SUPPRESS, metavar="FOLDER",
                   help="pin the plan of an earlier run (its run folder or student folder): its kept layers become "
                        "--keep, so an importance plan is not measured again")
    add_flags(p, DistillConfig, title="settings (defaults: the paper's; a recipe file sets them too)")


def _submit_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="paper (default) | cpu | a JSON file of settings")
    add_config_flags(p)


def distill_config_from_args(args, *, default_recipe: str = "auto") -> DistillConfig:
    """The run's settings from --recipe (or the run's own with --resume) and the flags over it
    (`training.resolve.resolve_config`); a queued job passes default_recipe="paper"."""
    given = values_from_args(args, DistillConfig)
    if "keep" in given:  # a layer list, ranges allowed: 0,2,4-10,29
        given["keep"] = parse_layer_list(",".join(given["keep"]))
    return resolve_config(getattr(args, "recipe", None), given, resume=getattr(args, "resume", False),
                          keep_from=getattr(args, "keep_from", None), default=default_recipe)


REQUEST_COMMANDS = {
    "distill": RequestCommand(_submit_distill_flags, lambda args: distill_config_from_args(args, default_recipe="paper")),
}


def cmd_distill(args) -> int:
    cfg = distill_config_from_args(args)
    if args.estimate:  # from the teacher's config alone: nothing is loaded, nothing written
        est = estimate_for(cfg)
        print(json.dumps(est.to_dict(), indent=2) if args.json else est.table())
        return 0
    if os.environ.get("RANK", "0") == "0" and "WORLD_SIZE" not in os.environ:
        cfg.check()  # the teacher's config, the plan, the context length, the data: before any weight is loaded
    if cfg.world_size > 1 and "WORLD_SIZE" not in os.environ:
        rdzv = Rendezvous(args.node_rank, args.rdzv, args.rdzv_timeout) if args.rdzv else None
        return launch_processes(cfg, resume=args.resume, stop_file=args.stop_file, rdzv=rdzv)
    result = run_distill(cfg, resume=args.resume, stop_file=args.stop_file)
    if result is None or result.stopped:
        return 0
    print(f"student written to {result.student_dir} ({result.steps_done} steps)")
    print(f"its family: boomerang family --student {result.student_dir}")
    if cfg.evaluate:
        print("evaluating the family (the standard evaluation; --no-evaluate skips it)")
        run_eval(EvalRequest.after_distillation(str(result.student_dir), device=str(resolve_device(cfg.device))))
    return 0


def run_distill(cfg: DistillConfig, *, resume: bool, stop_file: str | None = None):
    """One distillation in this process with a progress bar, Ctrl-C stopping after the step; the result (None on
    ranks other than 0)."""
    stop = {"asked": False}
    stop_path = Path(stop_file) if stop_file else None
    rank0 = os.environ.get("RANK", "0") == "0"

    def ask_stop(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        bar.write("stopping after this step (Ctrl-C again to abort without a checkpoint)...")

    bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, desc="distill", disable=not rank0)
    previous = signal.signal(signal.SIGINT, ask_stop)

    def on_step(r):
        terms = " ".join(f"{name} {value:.3f}" for name, value in r.terms.items())
        bar.set_postfix_str(f"loss {r.loss:.3f} {terms} lr {r.lr:.1e} {r.tokens_per_s:,.0f} tok/s", refresh=False)
        bar.update(r.step - bar.n)  # a resumed run starts past 0

    def should_stop() -> bool:
        return stop["asked"] or bool(stop_path and stop_path.exists())

    shown = {"at": 0.0}

    def on_phase(p):  # before the first step: what is happening, n/N, rate, ETA (every 2 s and at each end)
        if p.done in (0, p.total) or time.monotonic() - shown["at"] > 2:
            bar.write(p.text())
            shown["at"] = time.monotonic()

    try:
        result = distill(cfg, on_step=on_step, should_stop=should_stop, resume=resume, on_phase=on_phase)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if not rank0:
        return None
    if result.stopped:
        print(f"stopped at step {result.steps_done}/{cfg.steps}; checkpoint saved. "
              f"Continue with: boomerang distill --out {result.out} --resume")
    return result


def cmd_baselines(args) -> int:
    configs = at_size_configs(args.student, args.sizes, order=args.order, split=args.split)
    for cfg in configs:
        cfg.check()  # every one before the first starts
    for k, cfg in enumerate(configs, start=1):
        out = Path(cfg.out)
        n = len(cfg.keep or ())
        if is_done(cfg):
            print(f"[{k}/{len(configs)}] {n} layers: already distilled ({out / 'student'})")
            continue
        print(f"[{k}/{len(configs)}] distilling a {n}-layer student (teacher layers {cfg.keep}, {cfg.steps} steps) "
              f"into {out}")
        result = run_distill(cfg, resume=(out / "recipe.json").is_file())
        if result is None or result.stopped:
            print("stopped: run boomerang baselines again to continue where it stopped")
            return 0
    print(f"done: boomerang eval {args.student} puts them beside the family (series "
          f"'{'split' if args.split else 'distilled'}')")
    return 0


def cmd_snapshot(args) -> int:
    folder = snapshot(args.run, out=args.out)
    print(f"wrote the checkpoint as a student folder: {folder}")
    return 0
