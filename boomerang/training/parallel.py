"""One run on several processes: torchrun's process group, data-parallel helpers, FSDP, and the launcher.

`launch_processes(cfg)` starts `boomerang distill` under torchrun (one process per GPU) and waits;
the CLI and the workers both call it. Inside a run, the helpers below are no-ops with one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from boomerang.arch import adapter_for
from boomerang.errors import BoomerangError
from boomerang.models import resolve_device
from boomerang.settings import Settings
from boomerang.training.recipe import DistillConfig


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_device(cfg: DistillConfig) -> torch.device:
    """The one device a run puts everything on: the teacher, the student, every batch, the family after.

    With several CUDA processes, each takes the GPU of its local rank.
    """
    device = resolve_device(cfg.device)
    if device.type == "cuda" and launched_world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1)."""
    if launched_world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and FSDP work on the current device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def check_world(cfg: DistillConfig) -> None:
    """The processes a run has must be the ones its recipe asks for."""
    if cfg.world_size > 1 and "WORLD_SIZE" not in os.environ:
        raise BoomerangError(f"processes={cfg.processes} on nnodes={cfg.nnodes} needs one process per share: run "
                             "`boomerang distill` (it starts them with torchrun), queue a job, or run torchrun "
                             f"--nproc-per-node {cfg.processes} --nnodes {cfg.nnodes} yourself")
    if cfg.world_size > 1 and launched_world_size() != cfg.world_size:
        raise BoomerangError(f"the recipe asks for {cfg.world_size} processes ({cfg.processes} on each of {cfg.nnodes} "
                             f"machines) but {launched_world_size()} were started")


def all_mean(values: list[float], device) -> list[float]:
    """The mean over ranks of a few numbers (loss terms), for logging."""
    rank, size = world()
    if size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / size).tolist()


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average gradients over ranks: every rank then takes the same optimizer step."""
    rank, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: bool, device) -> bool:
    rank, size = world()
    if size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard(model: torch.nn.Module, device: torch.device, size: int) -> None:
    """FSDP2: every decoder layer its own unit, the rest (embeddings, head) in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh  # only in multi-process runs
    from torch.distributed.fsdp import fully_shard  # only in multi-process runs

    mesh = init_device_mesh(device.type, (size,))
    for layer in adapter_for(model).layer_list(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """The model's and optimizer's state dicts, whole (gathered from every rank when sharded, on the CPU)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, optim_state: dict,
                    sharded: bool) -> None:
    """The inverse of `full_state`: every rank reads the whole state and keeps its shards."""
    if not sharded:
        model.load_state_dict(state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


# ----------------------------------------------------------------------------- the launcher


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Rendezvous:
    """Where the machines of a multi-node run meet (torchrun's static rendezvous: node 0 hosts it)."""

    node_rank: int
    """This machine's place, 0 to nnodes - 1; node 0 holds global rank 0 (metrics, checkpoints, the student)."""
    endpoint: str
    """HOST:PORT of node 0, a port every machine can reach."""
    timeout: int = 600
    """Seconds to wait for every machine to join."""

    def check(self, nnodes: int) -> tuple[str, int]:
        host, sep, port = self.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BoomerangError(f"--rdzv must be HOST:PORT (node 0's address and a free port), got {self.endpoint!r}")
        if not 0 <= self.node_rank < nnodes:
            raise BoomerangError(f"--node-rank must be 0 to {nnodes - 1} for --nnodes {nnodes}, got {self.node_rank}")
        if self.timeout < 1:
            raise BoomerangError(f"--rdzv-timeout must be at least 1 second, got {self.timeout}")
        return host, int(port)


@dataclass
class NodeShare(Settings):
    """One machine's share of a queued multi-machine distillation: the job that a run's node-0 job queues for the
    worker of each other machine (`DistillConfig.node_queues`)."""

    recipe: DistillConfig
    """The run's settings, its run folder (`out`, on storage every machine sees) included."""
    node_rank: int
    """This machine's place, 1 to nnodes - 1."""
    rdzv: str
    """HOST:PORT of node 0."""
    rdzv_timeout: int = 600
    """Seconds to wait for every machine to join."""
    resume: bool = False
    """Whether node 0 resumes the run from its checkpoint (every machine must do the same)."""

    def __post_init__(self):
        self.check_types()
        self.rendezvous().check(self.recipe.nnodes)
        if self.node_rank == 0:
            raise BoomerangError("node 0 is the distillation job itself; a node job is 1 to nnodes - 1")

    def rendezvous(self) -> Rendezvous:
        return Rendezvous(self.node_rank, self.rdzv, self.rdzv_timeout)

    def check(self) -> None:
        """Nothing to check before queueing: node 0's job checked the recipe when it was queued."""


def node_address() -> str:
    """How the other machines reach this one: BOOMERANG_NODE_ADDRESS (`boomerang worker --address`), else the host
    name."""
    return os.environ.get("BOOMERANG_NODE_ADDRESS") or socket.getfqdn()


def free_port() -> int:
    """A TCP port free on this machine now (for node 0's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def torchrun_command(cfg: DistillConfig, rdzv: Rendezvous | None) -> list[str]:
    """torchrun's own arguments for this machine's share of the run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.processes)]
    if cfg.nnodes == 1:
        return [*cmd, "--standalone"]
    if rdzv is None:
        raise BoomerangError(f"nnodes={cfg.nnodes}: every machine needs --node-rank R and --rdzv HOST:PORT (node 0's "
                             "address and a free port), and an --out folder every machine sees")
    host, port = rdzv.check(cfg.nnodes)
    return [*cmd, "--nnodes", str(cfg.nnodes), "--node-rank", str(rdzv.node_rank), "--master-addr", host,
            "--master-port", str(port), "--rdzv-conf", f"timeout={rdzv.timeout}", "--max-restarts", "0"]


def launch_processes(cfg: DistillConfig, *, resume: bool = False, stop_file: str | None = None, log=None,
                     rdzv: Rendezvous | None = None) -> int:
    """Run this machine's share of a distillation, `cfg.processes` processes (torchrun, one per GPU), and wait for it;
    with `cfg.nnodes` above 1, they join the other machines' at `rdzv`.

    The processes run in their own session, so Ctrl-C reaches this launcher alone: the first one
    asks every process to stop after its current step (they checkpoint), a second one terminates them.
    `log` (a file) receives their output; default: this terminal. A rendezvous that does not complete raises a
    `BoomerangError` saying how many machines joined.
    """
    base = torchrun_command(cfg, rdzv)
    if resolve_device(cfg.device).type == "cuda" and cuda_count() < cfg.processes:
        raise BoomerangError(f"processes={cfg.processes} but only {cuda_count()} GPU(s) are visible here "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    with tempfile.TemporaryDirectory(prefix="boomerang-launch-") as tmp:
        recipe = Path(tmp) / "recipe.json"
        recipe.write_text(json.dumps(cfg.to_dict()))
        stop = Path(stop_file) if stop_file else Path(tmp) / "stop"
        cmd = [*base, "-m", "boomerang.cli", "distill", "--recipe", str(recipe), "--out", cfg.out, "--stop-file", str(stop)]
        cmd += ["--resume"] if resume else []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or
               str(max(1, (os.cpu_count() or 1) // cfg.processes))}
        watch = cfg.nnodes > 1  # read their output to tell a rendezvous that never completed from other failures
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE if watch else log,
                                stderr=subprocess.STDOUT if log or watch else None)
        tail = _Tail(proc, log) if watch else None
        if tail is not None:
            tail.start()
        asked = {"n": 0}

        def on_sigint(signum, frame):
            asked["n"] += 1
            if asked["n"] == 1:
                stop.touch()
                print(f"stopping all {cfg.processes} processes after this step (Ctrl-C again to terminate them)...",
                      file=sys.stderr)
            else:
                os.killpg(proc.pid, signal.SIGTERM)

        previous = signal.signal(signal.SIGINT, on_sigint) if log is None else None
        try:
            rc = proc.wait()
            if tail is not None:
                tail.join()
                _check_rendezvous(rc, tail.text, cfg, rdzv)
            return rc
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()


class _Tail(threading.Thread):
    """Copies a process's output to a file or this terminal as it comes, keeping its last few kilobytes."""

    def __init__(self, proc: subprocess.Popen, log):
        super().__init__(daemon=True)
        self.proc, self.log, self.text = proc, log, ""

    def run(self) -> None:
        sink = getattr(self.log, "buffer", self.log) if self.log is not None else sys.stdout.buffer
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]  # a BufferedReader
            sink.write(chunk)
            sink.flush()
            self.text = (self.text + chunk.decode(errors="replace"))[-16384:]


def _check_rendezvous(rc: int, output: str, cfg: DistillConfig, rdzv: Rendezvous | None) -> None:
    """A clear error for a multi-node launch whose machines never all met (torchrun's own words are a traceback)."""
    if rc == 0 or rdzv is None:
        return
    joined = re.search(r"(\d+)/(\d+) clients joined", output)
    if joined:
        raise BoomerangError(f"the rendezvous at {rdzv.endpoint} did not complete within {rdzv.timeout} s: "
                             f"{joined[1]} of {cfg.nnodes} machines joined (start `boomerang distill` with the same "
                             "settings and --rdzv on every machine, --node-rank 0 to "
                             f"{cfg.nnodes - 1}; --rdzv-timeout waits longer)")
    if "trying to connect" in output or "Connection refused" in output:
        raise BoomerangError(f"could not reach the rendezvous at {rdzv.endpoint} within {rdzv.timeout} s: node 0 "
                             "(--node-rank 0) hosts it; is it running, and is that address and port reachable from "
                             "here?")
