"""Writing the teacher's corpus (`--data teacher`): documents per minute at several batch sizes.

The distillation's first phase has the teacher write its own training texts by sampling
(`boomerang.data.teacher_documents`). On a CPU its decode step is bound by reading the weights, so
rows of a batch come almost free until the matrix products turn compute-bound; this measures where,
side by side in one run, on the same prompts and settings as a real job (no cache).

    python bench/bench_corpus.py [--docs 32] [--tokens 192] [--batches 8,16,32,64]
"""

from __future__ import annotations

import argparse
import time

import torch

from boomerang.data import teacher_documents
from boomerang.models import load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="default")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=192, help="max new tokens per document (a job's setting)")
    p.add_argument("--batches", default="8,16,32,64")
    args = p.parse_args()
    teacher = load_teacher(args.teacher)
    print(f"teacher {teacher.source}, {args.docs} documents of up to {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    rates = {}
    for bs in (int(b) for b in args.batches.split(",")):
        start = time.perf_counter()
        docs = teacher_documents(teacher, n_docs=args.docs, max_new_tokens=args.tokens, batch_size=bs)
        seconds = time.perf_counter() - start
        tokens = sum(len(teacher.tokenizer(d, add_special_tokens=False).input_ids) for d in docs)
        rates[bs] = tokens / seconds
        print(f"batch {bs:>3}: {seconds:6.1f} s  {tokens:6d} tokens written  {rates[bs]:6.1f} tokens/s  "
              f"{args.docs / seconds * 60:5.1f} documents/min", flush=True)
    first = next(iter(rates))
    for bs, rate in rates.items():
        print(f"batch {bs} vs batch {first}: {rate / rates[first]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
