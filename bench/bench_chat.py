"""Chat streaming: tokens/s of each side of the side-by-side panel vs. plain `model.generate` alone.

All in one run on the same models (default: the packaged teacher and its freshly cut student, the
middle size), greedy, a fixed number of new tokens:
  1. plain `generate` of the size alone, then of the teacher alone (the references);
  2. one side-by-side chat (size and teacher streaming at once, one thread each, as in the dashboard);
  3. two side-by-side chats at the same time (four generations on the machine's cores).

    python bench/bench_chat.py [--teacher default] [--student DIR] [--tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from boomerang.family import Family
from boomerang.generation import Sampling, prompt_ids, stream_pair
from boomerang.models import load_teacher
from boomerang.plan import LayerPlan
from boomerang.student import cut_student, load_student

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def plain(model, tok, n: int) -> float:
    ids = prompt_ids(tok, PROMPT)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    took = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / took


def side_by_side(size, teacher, tok, n: int) -> list[float]:
    sampling = Sampling(max_new_tokens=n, temperature=0)
    *_, last = stream_pair([(size, PROMPT), (teacher, PROMPT)], tok, sampling, threading.Event())
    return [r.tokens / r.elapsed_s for r in last]  # end to end, as the user sees it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--student", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    teacher = load_teacher(args.teacher)
    if args.student:
        student, manifest = load_student(args.student, teacher)
        plan = manifest.plan
    else:
        plan = LayerPlan.from_rule(teacher.n_layers)
        student = cut_student(teacher.model, plan, share=True)
    fam = Family(teacher.model, student, plan)
    n_mid = fam.layer_counts[len(fam.layer_counts) // 2]
    size, tok, n = fam.build(n_mid), teacher.tokenizer, args.tokens
    # generation never hits EOS early here: min_new_tokens in plain, and the stream is long enough
    size.generation_config.min_new_tokens = teacher.model.generation_config.min_new_tokens = n
    print(f"teacher {teacher.source}; size {n_mid} layers vs teacher {teacher.n_layers}; {n} new tokens, greedy; "
          f"torch threads {torch.get_num_threads()}")
    plain(size, tok, 4)  # warm-up
    rows = {"size alone (generate)": [], "teacher alone (generate)": [], "size in one chat": [],
            "teacher in one chat": [], "size, two chats at once": [], "teacher, two chats at once": []}
    for _ in range(args.repeats):
        rows["size alone (generate)"].append(plain(size, tok, n))
        rows["teacher alone (generate)"].append(plain(teacher.model, tok, n))
        a, b = side_by_side(size, teacher.model, tok, n)
        rows["size in one chat"].append(a), rows["teacher in one chat"].append(b)
        results = []
        threads = [threading.Thread(target=lambda results=results: results.append(side_by_side(size, teacher.model, tok, n)))
                   for _ in range(2)]
        [t.start() for t in threads], [t.join() for t in threads]
        rows["size, two chats at once"].append(statistics.mean(r[0] for r in results))
        rows["teacher, two chats at once"].append(statistics.mean(r[1] for r in results))
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"{k:<28} {v:7.1f} tokens/s")
    s_alone, t_alone = med["size alone (generate)"], med["teacher alone (generate)"]
    print(f"one chat, each side vs. alone: size {med['size in one chat'] / s_alone:.2f}, "
          f"teacher {med['teacher in one chat'] / t_alone:.2f}")
    print(f"one chat vs. the two models generated one after the other: "
          f"{(1 / s_alone + 1 / t_alone) / max(1 / med['size in one chat'], 1 / med['teacher in one chat']):.2f}x "
          "less wall time for both replies")
    print(f"two chats at once, each side vs. alone: size {med['size, two chats at once'] / s_alone:.2f}, "
          f"teacher {med['teacher, two chats at once'] / t_alone:.2f}")


if __name__ == "__main__":
    main()
