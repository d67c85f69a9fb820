"""GGUF export against what it is for: llama.cpp's speed and fidelity on one size, beside `boomerang`'s own.

Measured side by side in one run, on one size of a family (the quick start's 23 layers by default), with
the optional llama.cpp extra installed (`bash scripts/install_llamacpp.sh`):

1. file sizes: the Hugging Face folder (float32 safetensors) and GGUF at f16, q8_0 and q4_k_m;
2. fidelity to the float32 size on held-out text (the package's general held-out text, 512 tokens): top-1
   agreement and KL(float32 || file) of llama.cpp's next-token distributions at every position;
3. one greedy stream of `--tokens` new tokens: llama.cpp at each type against `model.generate` in this
   process in float32 and bfloat16 (tokens/s, same prompt, same thread count).

    python bench/bench_gguf.py --student DIR [--size 23] [--tokens 64] [--threads 2] [--no-repack]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from boomerang.export import export_size, export_size_gguf
from boomerang.family import mean_kl
from boomerang.student import open_family

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details."


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def llama_cpp_model(path: Path, threads: int, repack: bool = True):
    import llama_cpp
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params
    if not repack:  # llama.cpp's --no-repack: no extra buffer types (repacked and AMX weight layouts)
        def without_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        native.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=threads, seed=0)
    finally:
        native.llama_model_default_params = defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True)
    ap.add_argument("--size", type=int, default=23)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", default="best")
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp without weight repacking (its AMX path segfaults on quantized files on some Intel "
                         "CPUs: ggml-org/llama.cpp#20824)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    opened = open_family(args.student, order=args.order)
    tok, fam = opened.teacher.tokenizer, opened.family
    size = fam.build(args.size)
    text = files("boomerang.resources").joinpath("general_heldout.txt").read_text()
    ids = tok(text).input_ids[:512]
    with torch.no_grad():
        ref = size(torch.tensor([ids])).logits[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]

    rows = []
    with tempfile.TemporaryDirectory() as work:
        hf = export_size(fam, args.size, Path(work) / "hf", tokenizer=tok)
        rows.append(("HF folder, float32", folder_bytes(hf), None, None, None))
        for type_ in ("f16", "q8_0", "q4_k_m"):
            path = export_size_gguf(fam, args.size, Path(work) / f"{type_}.gguf", type_=type_, tokenizer=tok,
                                    teacher_source=opened.teacher.source)
            llm = llama_cpp_model(path, args.threads, repack=not args.no_repack)
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
            top1 = float((theirs.argmax(-1) == ref.argmax(-1)).float().mean())
            kl = mean_kl(ref[None], theirs[None])
            llm.reset()
            start, n = time.perf_counter(), 0
            for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                n += 1
                if n == args.tokens:
                    break
            rows.append((f"GGUF {type_}, llama.cpp", path.stat().st_size, top1, kl, n / (time.perf_counter() - start)))
            llm.close()
    for dtype in (torch.float32, torch.bfloat16):
        model = size.to(dtype) if dtype != torch.float32 else size
        x = torch.tensor([prompt])
        with torch.no_grad():
            model.generate(x, max_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            out = model.generate(x, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        rate = (out.shape[1] - x.shape[1]) / (time.perf_counter() - start)
        rows.append((f"boomerang generate, {str(dtype).split('.')[1]}", None, None, None, rate))
    print(f"{args.size}-layer size of {args.student} ({args.order} order), {args.threads} threads, "
          f"{args.tokens} new tokens, fidelity on {len(ids)} held-out tokens")
    print(f"{'':32} {'MiB':>8} {'top-1':>7} {'KL':>8} {'tok/s':>7}")
    for name, nbytes, top1, kl, rate in rows:
        cells = [f"{nbytes / 2**20:8.1f}" if nbytes else f"{'':8}", f"{top1:7.3f}" if top1 is not None else f"{'':7}",
                 f"{kl:8.4f}" if kl is not None else f"{'':8}", f"{rate:7.1f}" if rate else f"{'':7}"]
        print(f"{name:32} {' '.join(cells)}")
    llama_rate = rows[1][4]
    print(f"llama.cpp f16 against boomerang float32: {llama_rate / rows[-2][4]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
