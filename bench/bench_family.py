"""Build every size of a family two ways, side by side: shared (ours) and deep-copied (the obvious way).

Prints, for each way, the time to build all sizes and the extra memory they hold (resident set
growth while every size is alive), and the ratios. Default: the packaged SmolLM2-135M-Instruct.

    python bench/bench_family.py [--teacher default] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from torch import nn

from boomerang.family import Family
from boomerang.models import load_teacher
from boomerang.plan import LayerPlan
from boomerang.student import cut_student


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def build_by_copying(fam: Family, n_layers: int) -> nn.Module:
    """The obvious implementation: deep-copy the student, then deep-copy teacher blocks into it."""
    if n_layers == fam.plan.n_teacher:
        return copy.deepcopy(fam.teacher)
    model = copy.deepcopy(fam.student)
    t_layers = fam.arch.layer_list(fam.teacher)
    s_layers = fam.arch.layer_list(model)
    new = []
    for who, i in fam.plan.layers_after_patching(set(fam.patched_for(n_layers))):
        new.append(copy.deepcopy(t_layers[i]) if who == "teacher" else s_layers[i])
    for pos, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = pos
    setattr(fam.arch.base_model(model), fam.arch.layers, nn.ModuleList(new))
    model.config.num_hidden_layers = len(new)
    return model


def measure(build, fam: Family) -> tuple[float, int, list]:
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    held = [build(n) for n in fam.layer_counts]
    took = time.perf_counter() - start
    extra = rss_bytes() - before
    return took, extra, held


def check_same(fam: Family, a: list, b: list, ids: torch.Tensor) -> None:
    with torch.no_grad():
        for x, y in zip(a, b, strict=False):
            torch.testing.assert_close(x(ids).logits, y(ids).logits, rtol=0, atol=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    teacher = load_teacher(args.teacher)
    plan = LayerPlan.from_rule(teacher.n_layers)
    student = cut_student(teacher.model, plan)
    fam = Family(teacher.model, student, plan)
    print(f"teacher {teacher.source}: {teacher.n_layers} layers; {len(fam.layer_counts)} sizes "
          f"({fam.layer_counts[0]}..{fam.layer_counts[-1]} layers); torch threads {torch.get_num_threads()}")
    ids = teacher.tokenizer("A quick check that both ways give the same model.", return_tensors="pt").input_ids
    shared_t, copied_t, shared_m, copied_m = [], [], [], []
    for _ in range(args.repeats):
        t, m, shared = measure(fam.build, fam)
        shared_t.append(t), shared_m.append(m)
        t, m, copied = measure(lambda n: build_by_copying(fam, n), fam)
        copied_t.append(t), copied_m.append(m)
        check_same(fam, shared, copied, ids)
        del shared, copied
    st, ct = statistics.median(shared_t), statistics.median(copied_t)
    sm, cm = statistics.median(shared_m), statistics.median(copied_m)
    n = len(fam.layer_counts)
    print(f"{'way':<8} {'all sizes':>12} {'per size':>12} {'extra memory':>14}")
    print(f"{'shared':<8} {st * 1e3:>10.2f}ms {st / n * 1e3:>10.3f}ms {sm / 2**20:>12.1f}MB")
    print(f"{'copied':<8} {ct * 1e3:>10.2f}ms {ct / n * 1e3:>10.3f}ms {cm / 2**20:>12.1f}MB")
    print(f"sharing is {ct / st:.0f}x faster; extra memory {sm / 2**20:.1f} MB shared vs {cm / 2**20:.0f} MB copied "
          f"(median of {args.repeats}; logits of every size checked identical both ways)")


if __name__ == "__main__":
    main()
