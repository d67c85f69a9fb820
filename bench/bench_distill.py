"""Training throughput: our distillation step vs. a plain reference-style step, side by side.

The reference does what a first implementation does: teacher and student forward with every hidden
state returned, losses computed the straightforward way with boolean-mask copies of logits and
states. Both train the same freshly cut student on the same batches with the same optimizer
settings; steps alternate between the two so that machine noise hits both alike.

    python bench/bench_distill.py [--teacher default] [--batch-size 4] [--seq-len 128] [--steps 5] [--precision auto]
                                  [--profile]

`--profile`: where our step's time goes (torch.profiler over 2 more steps: the operators with the most time of
their own), to compare precisions.

Ours runs as `boomerang distill` does (`--precision auto`: bf16 autocast on a GPU, and on a CPU with native
bfloat16 measured faster; float32 master weights); the reference in float32 on a CPU, bf16 autocast on a GPU.

Also prints achieved FLOP/s against 6*N_student*tokens + 2*N_teacher*tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from boomerang.training.loop import make_optimizer, optimizer_step, setup
from boomerang.training.recipe import DistillConfig


def reference_step(teacher, student, optimizer, ids, plan, cfg) -> float:
    """One optimizer step the straightforward way."""
    optimizer.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    s_out = student(ids, output_hidden_states=True)
    s_logits, t_logits = s_out.logits[mask], t_out.logits[mask]  # boolean-mask copies (N, V)
    ce = F.cross_entropy(s_out.logits[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
    cos = 0
    for j, i in plan.alignment:
        # hidden_states[k + 1] is the output of layer k, except the last entry, which is after the final norm
        s_h = s_out.hidden_states[j + 1][mask]
        t_h = t_out.hidden_states[i + 1][mask]
        cos = cos + (1 - F.cosine_similarity(s_h, t_h, dim=-1)).mean()
    loss = cfg.ce_weight * ce + cfg.kl_weight * kl + cfg.cosine_weight * cos / len(plan.alignment)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
    optimizer.step()
    return float(loss.detach())


def count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "boomerang/resources/calibration.txt"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="ours: auto | bf16 | fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="also profile 2 of our steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillConfig(teacher=args.teacher, data=args.data, out=f"{tmp}/run", steps=1000,
                            batch_size=args.batch_size, seq_len=args.seq_len, device=args.device,
                            heldout_fraction=0.01, warmup=0.0, schedule="constant", precision=args.precision)
        run = setup(cfg)
        ref_student = copy.deepcopy(run.student)
        ref_opt = make_optimizer(ref_student, cfg)
        device = run.device
        print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch threads {torch.get_num_threads()}, batch {args.batch_size} x {args.seq_len} tokens; ours computes "
              f"in {cfg.autocast_dtype(device) or 'float32'} (--precision {args.precision})")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        ours, ref = [], []
        for step in range(args.steps + 1):  # the first step of each is a warm-up
            ids = run.data.batch(step, cfg.batch_size, cfg.seed).to(device)
            sync()
            t0 = time.perf_counter()
            optimizer_step(run, step)
            sync()
            t1 = time.perf_counter()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast:
                reference_step(run.teacher.model, ref_student, ref_opt, ids, run.plan, cfg)
            sync()
            t2 = time.perf_counter()
            if step:
                ours.append(t1 - t0), ref.append(t2 - t1)
        tokens = cfg.batch_size * cfg.seq_len
        n_s, n_t = count(run.student), count(run.teacher.model)
        flops = 6 * n_s * tokens + 2 * n_t * tokens
        o, r = statistics.median(ours), statistics.median(ref)
        print(f"{'loop':<10} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8}")
        print(f"{'ours':<10} {o:>8.3f} {tokens / o:>10.0f} {flops / o / 1e12:>8.3f}")
        print(f"{'reference':<10} {r:>8.3f} {tokens / r:>10.0f} {flops / r / 1e12:>8.3f}")
        print(f"ours / reference throughput: {r / o:.2f}x (median of {args.steps} steps each, alternating; "
              f"FLOPs per step = 6*{n_s:,}*{tokens} + 2*{n_t:,}*{tokens})")
        if args.profile:
            profile(run, args.steps + 1, sync)


def profile(run, first: int, sync) -> None:
    """Our step's operators by their own time, over 2 steps (the top 10, and the share of the step each takes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for step in range(first, first + 2):
            optimizer_step(run, step)
        sync()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of 2 steps (ours): {total / 1e6:.2f} s of operator time; the 10 largest by their own time")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {e.key:<40} {e.self_cpu_time_total / 1e6:7.3f} s  {100 * e.self_cpu_time_total / total:5.1f} %  "
              f"{e.count:>6} calls")


if __name__ == "__main__":
    main()
