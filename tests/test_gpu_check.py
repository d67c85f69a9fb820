"""bench/gpu_check.sh, the check a lent GPU runs: its code runs here on a tiny shape (every row, every check
passing), and on a machine without CUDA the script refuses in one line that says what runs here instead."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_its_whole_table_on_a_tiny_shape_here(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--shapes", "tiny",
                          "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--new-tokens", "4", "--json",
                          str(tmp_path / "table.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "table.json").read_text())
    whats = [r["what"] for r in rows]
    assert whats[0].startswith("distill step") and rows[0]["value"].endswith("tokens/s")
    assert "KL in chunks of positions = whole" in whats and sum("greedy decoding" in w for w in whats) == 2
    assert all(r.get("ok", True) for r in rows), rows
    assert "shape  check" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_gpu_check_refuses_in_one_line():
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})  # this interpreter, wherever its venv is
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: bench/gpu_check.sh needs a CUDA GPU")
    assert "--device cpu --shapes tiny" in out.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--shapes", "7b"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown shape 7b: use tiny, 135m, 1.7b" in bad.stderr
