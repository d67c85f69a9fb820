"""What bfloat16 buys and costs on this machine: speed side by side with float32, and quality of every size.

Speed (same process, alternating, median of --repeats): a forward pass of 8 x 128 tokens of the teacher, and a
distillation step of the `cpu` recipe's shape (4 x 128 tokens, student forward + backward, teacher forward) with
float32 compute and with bf16 autocast (float32 master weights). Quality: for every size of a family (the
`--student` folder's, or a freshly cut student's), KL(fp32 || bf16) of the next-token distributions and top-1
agreement on `--text` (default: the shipped WikiText-2 test excerpt), next to the same size's KL to the
teacher (the distance bfloat16 is small against). With `--tasks`, the shipped multiple-choice tasks of the
teacher, the student and the middle size in both dtypes (accuracy and standard error).

    python bench/bench_bf16.py [--student DIR] [--tokens 4096] [--repeats 5] [--tasks]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from boomerang import data as d
from boomerang import precision
from boomerang.evaluation.metrics import label_free_many
from boomerang.models import load_teacher
from boomerang.plan import LayerPlan, PaperRule
from boomerang.student import cut_student, open_family


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def family_of(student: str | None, dtype: str):
    if student:
        opened = open_family(student, dtype=dtype, order="last")
        return opened.teacher, opened.family
    from boomerang.family import Family

    teacher = load_teacher("default", dtype=dtype)
    plan = LayerPlan.from_rule(teacher.n_layers, PaperRule())
    return teacher, Family(teacher.model, cut_student(teacher.model, plan, share=True), plan)


@torch.no_grad()
def quality(args) -> None:
    t32, f32 = family_of(args.student, "float32")
    t16, f16 = family_of(args.student, "bfloat16")
    blocks = d.general_blocks(args.text or d.SHIPPED_GENERAL, t32.tokenizer, args.tokens)
    print(f"\nquality on {blocks.numel():,} tokens of {args.text or 'the shipped WikiText-2 excerpt'}"
          f" ({'student ' + args.student if args.student else 'freshly cut student'}, last-k order)")
    print(f"{'layers':>6} {'KL(fp32||bf16)':>15} {'top-1 agree':>12} {'KL to teacher (fp32)':>21}")
    worst_kl, worst_top1 = 0.0, 1.0
    for n in f32.layer_counts:
        ref, low = f32.build(n), f16.build(n)
        vs_dtype = label_free_many({"bf16": low}, ref, blocks)["bf16"]
        vs_teacher = label_free_many({"fp32": ref}, t32.model, blocks)["fp32"]
        worst_kl, worst_top1 = max(worst_kl, vs_dtype.kl_to_teacher), min(worst_top1, vs_dtype.top1_agreement)
        print(f"{n:>6} {vs_dtype.kl_to_teacher:>15.4f} {vs_dtype.top1_agreement:>12.3f} {vs_teacher.kl_to_teacher:>21.3f}")
    print(f"worst over sizes: KL {worst_kl:.4f}, top-1 {worst_top1:.3f}")
    if args.tasks:
        tasks(args, (t32, f32), (t16, f16))


def tasks(args, fp32, bf16) -> None:
    from boomerang.evaluation import task_files
    from boomerang.evaluation.metrics import EvalSettings, lm_eval_task, metrics_of

    settings = EvalSettings(limit=args.limit)
    names = task_files.shipped_tasks()
    specs = task_files.resolve(names, None)
    fam = fp32[1]
    sizes = [fam.plan.n_teacher, fam.layer_counts[len(fam.layer_counts) // 2], fam.plan.n_student]
    print(f"\nshipped tasks, {args.limit} items each: accuracy (standard error)")
    print(f"{'task':>16} {'layers':>6} {'fp32':>16} {'bf16':>16} {'diff/se':>8}")
    for name, spec in zip(names, specs, strict=True):
        for n in sizes:
            accs = []
            for teacher, family in (fp32, bf16):
                accs.append(metrics_of(lm_eval_task(family.build(n), teacher.tokenizer, spec, settings))["acc"])
            (a, se), (b, _) = accs
            se = se or 0.0
            print(f"{name:>16} {n:>6} {a:>9.3f} ({se:.3f}) {b:>9.3f} ({se:.3f}) {abs(a - b) / max(se, 1e-9):>8.2f}")


def speed(args) -> None:
    teacher = load_teacher("default", dtype="float32")
    low = load_teacher("default", dtype="bfloat16")
    ids = torch.randint(0, teacher.model.config.vocab_size, (8, 128))
    with torch.no_grad():
        teacher.model(ids[:1]), low.model(ids[:1])  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a += timed(lambda: teacher.model(ids), 1)
            b += timed(lambda: low.model(ids), 1)
    fwd = statistics.median(a) / statistics.median(b)
    print(f"forward 8 x 128: fp32 {statistics.median(a) * 1e3:.0f} ms, bf16 {statistics.median(b) * 1e3:.0f} ms: {fwd:.2f}x")

    plan = LayerPlan.from_rule(teacher.n_layers, PaperRule())
    student = cut_student(teacher.model, plan).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = ids[:4]

    def step(autocast: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            s = student(batch).logits
            with torch.no_grad():
                t = teacher.model(batch).logits
            loss = torch.nn.functional.kl_div(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1),
                                              log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(False), step(True)  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a += timed(lambda: step(False), 1)
        b += timed(lambda: step(True), 1)
    ratio = statistics.median(a) / statistics.median(b)
    print(f"distillation step 4 x 128: fp32 {statistics.median(a) * 1e3:.0f} ms, bf16 autocast "
          f"{statistics.median(b) * 1e3:.0f} ms: {ratio:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student)")
    p.add_argument("--text", default=None, help="text file for the quality numbers (default: the shipped excerpt)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tasks", action="store_true", help="also the shipped tasks of three sizes in both dtypes")
    p.add_argument("--limit", type=int, default=100, help="items per task with --tasks")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}; auto here: {precision.describe('cpu')}")
    if not args.skip_speed:
        speed(args)
    quality(args)


if __name__ == "__main__":
    main()
