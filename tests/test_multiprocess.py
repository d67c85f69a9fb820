"""One distillation on two processes (torchrun, gloo on CPU) against one process on the same global batch.

Data parallel (each process a full copy, gradients averaged) and FSDP (teacher and student sharded
over the processes) must both follow the single-process run: same loss at every step, same final
weights, within a stated tolerance (fp32 sums in another order).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tiny import save_tiny_teacher

TEXT = "Two processes share one global batch; their averaged gradients make one step. " * 80
TERMS = ("ce", "kl", "cosine", "local")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "boomerang.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, global batch 4; every loss term on, the blockwise one included."""
    tmp = tmp_path_factory.mktemp("mp")
    save_tiny_teacher(tmp / "teacher", "llama")
    (tmp / "text.txt").write_text(TEXT)
    common = ["--recipe", "paper", "--teacher", str(tmp / "teacher"), "--data", str(tmp / "text.txt"), "--steps", "5",
              "--seq-len", "16",
              "--lr", "1e-3", "--warmup", "0.2", "--device", "cpu", "--local-weight", "1.0", "--checkpoint-every", "2"]
    cli("distill", *common, "--batch-size", "4", "--out", str(tmp / "one"))
    return tmp, common


def curve(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, two):
    a, b = curve(one), curve(two)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5], "rank 0 alone logs, once per step"
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    # stated tolerance: losses within 1e-4 relative, final weights within 1e-4 absolute
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    for key in TERMS:
        assert [r["terms"][key] for r in b] == pytest.approx([r["terms"][key] for r in a], rel=1e-4), key
    wa = torch.load(one / "checkpoint.pt", weights_only=True)["student"]
    wb = torch.load(two / "checkpoint.pt", weights_only=True)["student"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(single):
    tmp, common = single
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "boomerang.cli", "distill", *common, "--batch-size", "2",
                    "--out", str(tmp / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True, timeout=300)
    assert_same_run(tmp / "one", tmp / "two")


def test_fsdp_on_two_processes_stopped_and_resumed_matches_one_process(single):
    # `--processes 2` makes the command start torchrun itself; a stop file that is already there
    # stops both processes after step 1 with a (gathered) checkpoint; resuming loads it into the
    # shards, optimizer state included, and finishes the run.
    tmp, common = single
    stop = tmp / "stop-now"
    stop.touch()
    out = tmp / "fsdp"
    stopped = cli("distill", *common, "--batch-size", "2", "--processes", "2", "--fsdp", "--out", str(out),
                  "--stop-file", str(stop))
    assert "stopped at step 1/5" in stopped.stdout
    assert [r["step"] for r in curve(out)] == [1]
    stop.unlink()
    resumed = cli("distill", "--out", str(out), "--resume")
    assert "(5 steps)" in resumed.stdout
    assert_same_run(tmp / "one", out)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["processes"] == 2 and recipe["fsdp"] is True
    # the student folder is a plain model, whole, equal to the single-process one
    from safetensors.torch import load_file

    a, b = load_file(tmp / "one" / "student" / "model.safetensors"), load_file(out / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


def test_processes_without_a_launcher_is_refused_with_the_way_out(single):
    from boomerang.errors import BoomerangError
    from boomerang.training.loop import distill
    from boomerang.training.recipe import DistillConfig

    tmp, _ = single
    with pytest.raises(BoomerangError, match="run `boomerang distill`"):
        distill(DistillConfig(teacher=str(tmp / "teacher"), data=str(tmp / "text.txt"), processes=2,
                              out=str(tmp / "never")))
    assert not (tmp / "never").exists()
