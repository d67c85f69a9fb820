"""The `boomerang` command line: one module per command group, each command a thin function over the library.

- `engine`: teacher, family, cut, export, generate
- `training`: distill, baselines, snapshot
- `evaluation`: heldout, eval, compare
- the jobs layer (`worker`, `submit`, `jobs`, `cancel`, `retry`: `workers.cli`), the dashboard (`app`:
  `app.cli`) and the server (`serve`: `serve.cli`) register theirs through the entry-point group
  "boomerang.commands", so this package never imports them.

Flags of a command that builds a request come from its request class (`boomerang.settings.add_flags`):
names, types, defaults and help from the fields. Every listing also has `--json`.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from boomerang.cli import engine, evaluation, training
from boomerang.cli.training import distill_config_from_args
from boomerang.errors import BoomerangError

__all__ = ["build_parser", "distill_config_from_args", "main"]

REQUEST_COMMANDS = {**training.REQUEST_COMMANDS, **evaluation.REQUEST_COMMANDS, **engine.REQUEST_COMMANDS}
"""How `boomerang submit KIND` builds the request of the kinds whose direct command has more than its request's
fields (a recipe, the standard evaluation): the flags and the builder the direct command uses."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `boomerang jobs | head -3`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BoomerangError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging  # heavy: only once a command runs, not for --help

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boomerang", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands")
    for group in (engine, training, evaluation):
        group.register(sub)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Commands of the layers above the library (jobs, workers, dashboard, server)."""
    for ep in sorted(entry_points(group="boomerang.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub, {"requests": REQUEST_COMMANDS})
        except ImportError as exc:  # a layer whose dependencies are missing: the library still works
            print(f"warning: commands from {ep.value} unavailable ({exc})", file=sys.stderr)
