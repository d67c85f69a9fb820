"""Serving a whole family from one process: memory, API overhead, and what concurrent streams buy.

Measured side by side in one run, on the default teacher's family (a freshly cut student unless
--student is given):

1. weights held to serve every size: one copy of teacher + student (shared modules) vs each size loaded
   as its own exported model (the sum of every size's weights; exact, counted from the tensors);
2. one greedy stream through the HTTP API vs `model.generate` in this process, same size, same tokens;
3. total tokens/s with 1, 4 and 8 concurrent streams of one size, and 8 streams over 4 sizes;
4. with --load S: a load test of S seconds on loopback, requests arriving at random (a Poisson process, --rate
   per second, each for one of 4 sizes at random, --load-tokens tokens): time to first token (p50, p99) and
   tokens/s. `--repo DIR` serves from another checkout (the scheduler of an older commit, say), for comparisons.

    python bench/bench_serve.py [--student DIR] [--tokens 48] [--size 23] [--load 60 --rate 1.0 [--load-only]]
                                [--repo DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from boomerang.generation import prompt_ids
from boomerang.student import open_family

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details."


def weights_bytes(modules) -> int:
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(student: str, port: int, repo: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(repo).resolve())} if repo else None
    proc = subprocess.Popen([sys.executable, "-m", "boomerang.cli", "serve", "--student", student, "--port", str(port),
                             "--max-queue", "64", "--max-batch", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=repo, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def concurrent(base: str, models: list[str], tokens: int) -> tuple[float, int]:
    results: list[tuple] = []
    threads = [threading.Thread(target=stream, args=(base, m, tokens, results, f"{PROMPT} ({i})"))
               for i, m in enumerate(models)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    made = sum(r[1] for r in results)
    return made / took, made


def stream(base: str, model: str, tokens: int, out: list, prompt: str = PROMPT, sent: float | None = None) -> None:
    """One streamed greedy request of `tokens` tokens: (time to first token, tokens, seconds), from `sent` (default:
    now), appended to `out`."""
    sent = time.perf_counter() if sent is None else sent
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    first, made = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if first is None and '"content": "' in line:
                first = time.perf_counter() - sent
            if line.startswith("data: {") and '"usage": {' in line:
                made = json.loads(line[6:])["usage"]["completion_tokens"]
    out.append((first if first is not None else float("nan"), made, time.perf_counter() - sent))


def load_test(base: str, models: list[str], seconds: float, rate: float, tokens: int, seed: int = 0) -> dict:
    """Requests arriving as a Poisson process of `rate` per second for `seconds`; waits for all to finish."""
    rng = random.Random(seed)
    results: list = []
    threads = []
    start = time.perf_counter()
    at = rng.expovariate(rate)
    while at < seconds:
        time.sleep(max(0.0, start + at - time.perf_counter()))
        t = threading.Thread(target=stream, args=(base, rng.choice(models), tokens, results,
                                                  f"{PROMPT} ({len(threads)})", time.perf_counter()))
        t.start()
        threads.append(t)
        at += rng.expovariate(rate)
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    made = sum(r[1] for r in results)
    return {"requests": len(results), "tokens": made, "tokens_per_s": made / took, "seconds": took,
            "ttft_p50": statistics.quantiles(ttft, n=100)[49], "ttft_p99": statistics.quantiles(ttft, n=100)[98]}


def streams(base: str, name: str, args, in_process: float, made: int, mixed: list[str]) -> None:
    """Parts 2 and 3: one stream against `generate` in process, then concurrent streams."""
    one: list[tuple] = []
    stream(base, f"{name}-{args.size}L", args.tokens, one)
    _, made_api, api = one[0]
    print(f"2. one stream of {made_api} tokens ({args.size} layers): API {api:.2f} s vs in-process generate "
          f"{in_process:.2f} s ({made} tokens): {api / in_process:.2f}x the time (goal at most 1.1x)")
    rates = {}
    for n in (1, 4, 8):
        rates[n], total = concurrent(base, [f"{name}-{args.size}L"] * n, args.tokens)
        print(f"3. {n} concurrent streams of {args.size} layers: {rates[n]:6.1f} tokens/s in all "
              f"({total} tokens), {rates[n] / rates[1]:.2f}x one stream")
    rate, total = concurrent(base, mixed, args.tokens)
    print(f"   8 concurrent streams over 4 sizes (16, 20, 26, 30 layers): {rate:6.1f} tokens/s ({total} tokens), "
          f"{rate / rates[1]:.2f}x one stream")
    print(f"goals: 4 same-size streams at least 2.8x one stream: {rates[4] / rates[1]:.2f}x; 8 at least 3x: "
          f"{rates[8] / rates[1]:.2f}x; 8 over 4 sizes at least 2.7x: {rate / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--size", type=int, default=23)
    parser.add_argument("--load", type=float, default=0, help="seconds of Poisson load test (0: none)")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second in the load test")
    parser.add_argument("--load-tokens", type=int, default=32)
    parser.add_argument("--repo", default=None, help="serve from this checkout instead")
    parser.add_argument("--load-only", action="store_true", help="skip parts 2 and 3 (with --load)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        student = args.student or str(Path(tmp) / "fam")
        if not args.student:
            subprocess.run([sys.executable, "-m", "boomerang.cli", "cut", "--teacher", "default", "--out", student],
                           check=True, capture_output=True)
        opened = open_family(student, dtype="auto")  # as the server loads it
        fam, tok = opened.family, opened.teacher.tokenizer
        shared = weights_bytes([fam.teacher, fam.student])
        separate = sum(weights_bytes([fam.build(n)]) for n in fam.layer_counts)
        print(f"torch threads {torch.get_num_threads()}; family {len(fam.layer_counts)} sizes "
              f"{fam.layer_counts[0]}..{fam.layer_counts[-1]} layers; nothing else running is assumed")
        print(f"1. weights to serve every size: shared {shared / 2**20:,.0f} MB vs one model per size "
              f"{separate / 2**20:,.0f} MB: {separate / shared:.1f}x less (goal 7x)")

        model = fam.build(args.size)
        ids = prompt_ids(tok, [{"role": "user", "content": PROMPT}])
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False)
            in_process = time.perf_counter() - start
        made = out.shape[1] - ids.shape[1]
        del opened, fam, model

        port = free_port()
        proc = start_server(student, port, args.repo)
        base = f"http://127.0.0.1:{port}"
        try:
            name = httpx.get(base + "/v1/models").json()["data"][0]["id"].rsplit("-", 1)[0]
            stream(base, f"{name}-{args.size}L", 4, [])  # warm-up
            mixed = [f"{name}-{n}L" for n in (16, 20, 26, 30)] * 2
            if not args.load_only:
                streams(base, name, args, in_process, made, mixed)
            if args.load:
                r = load_test(base, mixed[:4], args.load, args.rate, args.load_tokens)
                print(f"4. load test {args.load:.0f} s, {args.rate} requests/s (Poisson) over 4 sizes, {args.load_tokens} "
                      f"tokens each: {r['requests']} requests, {r['tokens_per_s']:.1f} tokens/s, time to first token "
                      f"p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s ({r['seconds']:.0f} s until the last "
                      "finished)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
