"""One distillation on two processes (torchrun, gloo on CPU) against one process on the same global batch.

Data parallel (each process a full copy, gradients averaged) and FSDP (teacher and student sharded
over the processes) must both follow the single-process run: same loss at every step, same final
weights, within a stated tolerance (fp32 sums in another order).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def launch_nodes(common, out, rdzv, *extra, nodes=(0, 1)):
    """`boomerang distill --nnodes 2` started as each of two "machines" on this one (loopback, one process each);
    `common` None: the run's own settings (a resume)."""
    settings = ["--batch-size", "2", "--nnodes", "2", *common] if common is not None else []
    return [subprocess.Popen([sys.executable, "-m", "boomerang.cli", "distill", *settings,
                              "--node-rank", str(r), "--rdzv", rdzv, "--out", str(out), *extra],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in nodes]


def worker_of_node(out, node: int) -> int:
    """The pid of the training process torchrun started for `node` (its GROUP_RANK) of the run writing to `out`."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"GROUP_RANK={node}".encode() in env and b"boomerang.cli" in cmd and str(out).encode() in cmd:
            return int(proc.name)
    raise AssertionError(f"no training process of node {node}")


def test_two_machines_over_loopback_match_one_process_on_the_same_global_batch(single):
    tmp, common = single
    procs = launch_nodes(common, tmp / "nodes", f"127.0.0.1:{free_port()}")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert_same_run(tmp / "one", tmp / "nodes")
    assert json.loads((tmp / "nodes" / "recipe.json").read_text())["nnodes"] == 2


def test_a_machine_killed_mid_run_leaves_a_checkpoint_both_resume_from(single):
    tmp, common = single
    out = tmp / "killed"
    procs = launch_nodes(common, out, f"127.0.0.1:{free_port()}", "--steps", "100")
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").is_file() or len(curve(out)) < 4:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint came"
        time.sleep(0.2)
    os.kill(worker_of_node(out, 1), signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=240)
    assert procs[1].returncode != 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert saved >= 2
    procs = launch_nodes(None, out, f"127.0.0.1:{free_port()}", "--resume")
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:]
    steps = [r["step"] for r in curve(out)]
    assert steps[-1] == 100 and steps == sorted(set(steps)), "every step once, to the end"


def test_a_rendezvous_that_never_completes_is_one_error_line_and_leaves_nothing(single):
    tmp, common = single
    out = tmp / "alone"
    (node0,) = launch_nodes(common, out, f"127.0.0.1:{free_port()}", "--rdzv-timeout", "3", nodes=(0,))
    text = node0.communicate(timeout=120)[0]
    assert node0.returncode != 0
    assert "error: the rendezvous at 127.0.0.1:" in text and "1 of 2 machines joined" in text
    assert not out.exists()
    (node1,) = launch_nodes(common, out, f"127.0.0.1:{free_port()}", "--rdzv-timeout", "3", nodes=(1,))
    text = node1.communicate(timeout=120)[0]
    assert node1.returncode != 0 and "error: could not reach the rendezvous at 127.0.0.1:" in text
    assert not out.exists()


def test_bad_rendezvous_settings_are_refused_before_any_work(single):
    tmp, common = single
    for extra, message in [((), "every machine needs --node-rank R and --rdzv HOST:PORT"),
                           (("--rdzv", "nohost"), "--rdzv must be HOST:PORT"),
                           (("--rdzv", "127.0.0.1:1", "--node-rank", "2"), "--node-rank must be 0 to 1")]:
        done = subprocess.run([sys.executable, "-m", "boomerang.cli", "distill", *common, "--nnodes", "2", *extra,
                               "--out", str(tmp / "refused")], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stdout + done.stderr, done.stderr[-1500:]
        assert not (tmp / "refused").exists()
