"""One distillation on two processes (torchrun, gloo on CPU) against one process on the same global batch."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tiny import save_tiny_teacher

TEXT = "Two processes share one global batch; their averaged gradients make one step. " * 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text.txt"), "--steps", "5",
              "--seq-len", "16", "--lr", "1e-3", "--warmup", "0.2", "--device", "cpu"]
    env_note = {"OMP_NUM_THREADS": "1"}
    import os

    env = {**os.environ, **env_note}
    one = subprocess.run([sys.executable, "-m", "boomerang.cli", "distill", *common, "--batch-size", "4",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "boomerang.cli", "distill", *common, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    curves = {}
    for name in ("one", "two"):
        curves[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curves["two"]] == [1, 2, 3, 4, 5], "rank 0 alone logs, once per step"
    assert [r["tokens"] for r in curves["two"]] == [r["tokens"] for r in curves["one"]]
    # stated tolerance: losses within 1e-4 relative, final weights within 1e-4 absolute (fp32 sums in another order)
    for key in ("loss", "ce", "kl", "cosine"):
        assert [r[key] for r in curves["two"]] == pytest.approx([r[key] for r in curves["one"]], rel=1e-4), key
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["student"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["student"]
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)
