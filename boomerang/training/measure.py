"""Measuring the peak memory of a distillation on this CPU (what `training.memory`'s estimate is checked against)."""

from __future__ import annotations

import os
import resource

import torch

from boomerang.training.loop import optimizer_step, setup


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Make the process's peak resident memory (VmHWM) start again from what it holds now (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""Run `measure_peak` in a fresh process with this environment: glibc then hands every large freed tensor back
at once (its default keeps freed blocks up to 32 MB, which resident memory would count as live)."""


def measure_peak(cfg, *, steps: int = 2) -> int:
    """Peak resident memory a CPU distillation adds over what the process held before it (bytes): the teacher
    loaded, the student cut, `steps` optimizer steps. Run it in a fresh process with MEASURE_ENV."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = rss_bytes()
    reset_peak()
    run = setup(cfg)
    for step in range(steps):
        optimizer_step(run, step)
    return peak_bytes() - base
