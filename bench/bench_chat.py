"""Chat streaming: tokens/s of each side of the side-by-side panel vs. plain `model.generate` alone.

All in one run on the same models (default: the packaged teacher and its freshly cut student, with its own
weights, the middle size; bfloat16 where the CPU does it well, as the dashboard), greedy, a fixed number of new
tokens, each measurement in a thread of its own (see `fresh`):
  1. plain `generate` of the size alone, then of the teacher alone (the references);
  2. one side-by-side chat (size and teacher decoded together in one thread, as in the dashboard);
  3. two side-by-side chats at the same time (four generations on the machine's cores);
  3b. the teacher alone through the chat's decoder (one side): the chat's ceiling, what it would gain if the
     size's reply cost nothing (a chat step runs at least every teacher layer and its head); and the same
     with one OpenMP thread (on this CPU about as fast as two: decoding is bound by per-call work on a core);
  3c. each side a decoder of its own in a thread of its own, one OpenMP thread each (no call shared, the two
     cores each running one side): the alternative to sharing calls;
  4. with --student: the same chat with the student owning every tensor, as before a student opened for use held
     the teacher's tensors where its are equal (`student.share_unchanged`: the `cpu` recipe's frozen ends and
     single-layer blocks), so that both are measured side by side in one run.

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


def fresh(fn, *args):
    """fn(*args) in a thread of its own, which ends with it.

    PyTorch's OpenMP (libgomp) gives every thread that runs a parallel op a team of worker threads for as long as
    it lives; once more threads are managed than there are cores, libgomp stops spinning between parallel regions
    and every op pays for a wake-up (a 576 x 1536 bfloat16 matmul here: 62 us -> 117 us). Each measurement runs in
    a thread that ends, as the dashboard's chat runs in its own thread, so that none pays for another's team."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


def plain(model, tok, n: int) -> float:
    ids = prompt_ids(tok, PROMPT)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    took = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / took


def each_in_a_thread(fn, models) -> list:
    """[fn(model) for each model], each in a thread of its own, all at once."""
    out: dict[int, object] = {}

    def run(i, model):
        out[i] = fn(model)

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(models)]
    [t.start() for t in threads], [t.join() for t in threads]
    return [out[i] for i in range(len(models))]


def two_threads(size, teacher, tok, n: int) -> list[float]:
    """The chat before the decoder: each side's `generate` in a thread of its own, at once (tokens/s each)."""
    return each_in_a_thread(lambda model: plain(model, tok, n), (size, teacher))


def one_thread(models: list, tok, n: int) -> list[float]:
    """`chat` with one OpenMP thread (in the calling thread, which `fresh` ends after)."""
    torch.set_num_threads(1)
    return chat(models, tok, n)


def split(size, teacher, tok, n: int) -> list[float]:
    """Each side a chat of its own (one decoder row) in a thread of its own with one OpenMP thread, at once (each
    thread's OpenMP team only; the threads end with it)."""
    return each_in_a_thread(lambda model: one_thread([model], tok, n)[0], (size, teacher))


def chat(models: list, tok, n: int) -> list[float]:
    """Tokens/s of each side of one chat of these models (one side: the decoder with one row)."""
    sampling = Sampling(max_new_tokens=n, temperature=0)
    *_, last = stream_pair([(m, PROMPT) for m in models], tok, sampling, threading.Event(), ignore_eos=True)
    return [r.tokens / r.elapsed_s for r in last]  # end to end, as the user sees it


def load(args):
    teacher = load_teacher(args.teacher, dtype=args.dtype)
    owning = None
    if args.student:
        from transformers import AutoModelForCausalLM

        student, manifest = load_student(args.student, teacher)
        plan = manifest.plan
        own = AutoModelForCausalLM.from_pretrained(args.student, dtype=teacher.model.dtype).eval()
        owning = Family(teacher.model, own, plan)  # every tensor its own: the size shares no call with the teacher's
    else:
        plan = LayerPlan.from_rule(teacher.n_layers)
        student = cut_student(teacher.model, plan)  # its own weights (a freshly cut student shares none)
    return teacher, Family(teacher.model, student, plan), owning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--student", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto (the dashboard's: bfloat16 where it pays) | float32 | ...")
    args = parser.parse_args()
    teacher, fam, owning = fresh(load, args)
    n_mid = fam.layer_counts[len(fam.layer_counts) // 2]
    size, tok, n = fam.build(n_mid), teacher.tokenizer, args.tokens
    # every side makes n tokens: min_new_tokens in plain generate, ignore_eos in the chat
    print(f"teacher {teacher.source}; size {n_mid} layers vs teacher {teacher.n_layers}; {n} new tokens, greedy; "
          f"{next(teacher.model.parameters()).dtype}; torch threads {torch.get_num_threads()}")
    fresh(plain, size, tok, 4)  # warm-up
    rows = {"size alone (generate)": [], "teacher alone (generate)": [], "size in one chat": [],
            "teacher in one chat": [], "teacher alone (chat's decoder)": [],
            "teacher alone (chat's decoder, 1 thread)": [],
            "size, a decoder per side": [], "teacher, a decoder per side": [], "size, two generate threads": [], "teacher, two generate threads": [],
            "size, two chats at once": [], "teacher, two chats at once": []}
    if owning:
        rows |= {"size in one chat, student owning": [], "teacher in one chat, student owning": []}
    for _ in range(args.repeats):
        rows["size alone (generate)"].append(fresh(plain, size, tok, n))
        rows["teacher alone (generate)"].append(fresh(plain, teacher.model, tok, n))
        a, b = chat([size, teacher.model], tok, n)
        rows["size in one chat"].append(a), rows["teacher in one chat"].append(b)
        rows["teacher alone (chat's decoder)"].append(fresh(chat, [teacher.model], tok, n)[0])
        rows["teacher alone (chat's decoder, 1 thread)"].append(fresh(one_thread, [teacher.model], tok, n)[0])
        a, b = split(size, teacher.model, tok, n)
        rows["size, a decoder per side"].append(a), rows["teacher, a decoder per side"].append(b)
        if owning:
            a, b = chat([owning.build(n_mid), teacher.model], tok, n)
            rows["size in one chat, student owning"].append(a), rows["teacher in one chat, student owning"].append(b)
        a, b = two_threads(size, teacher.model, tok, n)
        rows["size, two generate threads"].append(a), rows["teacher, two generate threads"].append(b)
        results = each_in_a_thread(lambda _: chat([size, teacher.model], tok, n), range(2))
        rows["size, two chats at once"].append(statistics.mean(r[0] for r in results))
        rows["teacher, two chats at once"].append(statistics.mean(r[1] for r in results))
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"{k:<36} {v:7.1f} tokens/s")
    s_alone, t_alone = med["size alone (generate)"], med["teacher alone (generate)"]

    def vs_serial(what: str) -> float:
        """How much sooner both replies come with `what` ('one chat', ...) than one `generate` after the other."""
        return (1 / s_alone + 1 / t_alone) / max(1 / med[f"size{what}"], 1 / med[f"teacher{what}"])

    print(f"one chat, each side vs. alone: size {med['size in one chat'] / s_alone:.2f}, "
          f"teacher {med['teacher in one chat'] / t_alone:.2f}")
    print(f"one chat vs. the two models generated one after the other: {vs_serial(' in one chat'):.2f}x "
          "less wall time for both replies")
    ceiling = (1 / s_alone + 1 / t_alone) * med["teacher alone (chat's decoder)"]
    print(f"the chat's ceiling (the teacher alone in its decoder, as if the size's reply cost nothing) vs. one after "
          f"the other: {ceiling:.2f}x")
    print(f"a decoder per side, one OpenMP thread each, vs. one after the other: {vs_serial(', a decoder per side'):.2f}x")
    if owning:
        print(f"one chat, student owning every tensor, vs. one after the other: "
              f"{vs_serial(' in one chat, student owning'):.2f}x")
    print(f"two generate threads at once (the chat before the decoder) vs. one after the other: "
          f"{vs_serial(', two generate threads'):.2f}x")
    print(f"two chats at once, each side vs. alone: size {med['size, two chats at once'] / s_alone:.2f}, "
          f"teacher {med['teacher, two chats at once'] / t_alone:.2f}")


if __name__ == "__main__":
    main()
