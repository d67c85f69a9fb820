"""Which floating-point type a path runs in: bfloat16 where this machine does it well, float32 elsewhere.

`--dtype auto` (the default of every path that only runs models: evaluation, chat, serving, `generate`)
and `--precision auto` (distillation's compute type, under autocast with float32 master weights) resolve
here. On CUDA, auto is bfloat16 where the card supports it. On a CPU it is bfloat16 only where the CPU
has bfloat16 instructions (x86 AVX512-BF16 or AMX, Arm's BF16 extension) *and* a matrix product measured
once on this machine runs at least `MIN_SPEEDUP` times faster in bfloat16 than in float32: a CPU without
the instructions emulates bfloat16 and runs it slower than float32. The measurement is kept in
`$BOOMERANG_HOME/machine.json`, keyed by CPU model, torch version and thread count, and takes about a
second the first time.

What bfloat16 costs in quality on the default teacher (KL to float32, top-1 agreement, accuracies) is
measured in docs/benchmarks.md; `--dtype float32` / `--precision fp32` (or `BOOMERANG_DTYPE=float32` for
every command at once) keeps float32 everywhere.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from functools import cache
from pathlib import Path

import torch

from boomerang.errors import BoomerangError
from boomerang.paths import boomerang_home, write_record

MIN_SPEEDUP = 1.2
"""bfloat16 is chosen on a CPU only where it beats float32 by this much on the measured product."""
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""/proc/cpuinfo flags (x86) and features (Arm) that mean native bfloat16 arithmetic."""
FILE = "machine.json"
ENV = "BOOMERANG_DTYPE"
"""Set to float32 (or bfloat16) to make every `auto` resolve to it."""
DTYPE_HELP = ("auto (default: bfloat16 on a GPU that has it and on a CPU with native bfloat16 measured faster here, "
              "else float32) | float32 | bfloat16 | float16")
NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
         "float16": "float16", "fp16": "float16"}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("model name", "cpu model", "hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 flags (empty where it has none, or where /proc/cpuinfo is not there)."""
    words: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("flags", "features")):
            words.update(line.split(":", 1)[1].split())
    return [f for f in CPU_BF16_FLAGS if f in words]


def measure_cpu_speedup(size: int = 1024, reps: int = 5) -> float:
    """float32 time / bfloat16 time of a (size x size) @ (size x 4 size) product, median of `reps` each."""

    def median_seconds(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, 4 * size).to(dtype)
        a @ b  # warm-up: the first call picks and caches the kernel
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        return median_seconds(torch.float32) / median_seconds(torch.bfloat16)


def _record_path() -> Path:
    return boomerang_home() / FILE


@cache
def cpu_bf16_speedup() -> float | None:
    """This machine's measured bfloat16 speed-up (None where the CPU has no native bfloat16): read from the
    machine record, measured and recorded the first time."""
    if not cpu_bf16_flags():
        return None
    key = f"{cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    path = _record_path()
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    entry = data.get("cpu_bf16", {})
    if entry.get("key") == key and isinstance(entry.get("speedup"), (int, float)):
        return float(entry["speedup"])
    speedup = measure_cpu_speedup()
    data["cpu_bf16"] = {"key": key, "speedup": round(speedup, 3), "at": time.strftime("%Y-%m-%d %H:%M")}
    write_record(path, data)  # a read-only home measures again next time, never fails
    return speedup


def auto_dtype(device: str | torch.device = "cpu") -> str:
    """What `auto` means on `device`: bfloat16 where it is native and pays, else float32."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced != "auto":
        return canonical(forced)
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if kind == "cpu":
        speedup = cpu_bf16_speedup()
        return "bfloat16" if speedup is not None and speedup >= MIN_SPEEDUP else "float32"
    return "float32"


def canonical(dtype: str) -> str:
    """float32 | bfloat16 | float16 from any accepted spelling (auto is resolved by `resolve`)."""
    try:
        return NAMES[dtype.strip().lower()]
    except KeyError:
        raise BoomerangError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def resolve(dtype: str | None, device: str | torch.device = "cpu") -> str:
    """A dtype name as given (None and "auto" resolved for `device`)."""
    if dtype is None or dtype.strip().lower() == "auto":
        return auto_dtype(device)
    return canonical(dtype)


def describe(device: str | torch.device = "cpu") -> str:
    """One line on what auto chose here and why (for `boomerang teacher` and logs)."""
    kind = torch.device(device).type
    chosen = auto_dtype(device)
    if os.environ.get(ENV, "").strip().lower() not in ("", "auto"):
        return f"{chosen} ({ENV} is set)"
    if kind != "cpu":
        return chosen
    flags = cpu_bf16_flags()
    if not flags:
        return f"{chosen} (the CPU has no native bfloat16)"
    return f"{chosen} (CPU {', '.join(flags)}; bfloat16 measured {cpu_bf16_speedup():.2f}x float32 here)"
