"""Streaming two models at once, decoded together, with one stop flag for both.

`stream_pair` yields snapshots of both replies as tokens arrive; `Stop` (a threading.Event) ends
generation on both sides at the next token. Each side reports tokens, tokens/s and time to first
token.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from boomerang.decoding import Decoder, DecodeRow
from boomerang.errors import BoomerangError
from boomerang.settings import Settings


@dataclass
class Sampling(Settings):
    """Decoding settings of a chat turn or a `generate` call."""

    max_new_tokens: int = 128
    """Tokens generated at most (1 to 32,768)."""
    temperature: float = 0.7
    """0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    seed: int = 0
    """Seed of the sampling: a 64-bit integer."""

    def __post_init__(self):
        self.check_types()
        if not -(2**63) <= self.seed < 2**63:
            raise BoomerangError(f"seed must be a 64-bit integer (from -2**63 to 2**63 - 1), got {self.seed}")
        if not 1 <= self.max_new_tokens <= 32_768:
            raise BoomerangError(f"max_new_tokens must be between 1 and 32,768, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise BoomerangError(f"temperature must be between 0 (greedy) and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BoomerangError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Reply:
    """One side's reply so far."""

    text: str = ""
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    done: bool = False
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        gen = self.elapsed_s - (self.first_token_s or 0)
        return (self.tokens - 1) / gen if self.tokens > 1 and gen > 0 else 0.0

    def stats(self) -> str:
        if self.error:
            return f"error: {self.error}"
        ttft = f"{self.first_token_s * 1000:.0f} ms" if self.first_token_s is not None else "-"
        return f"{self.tokens} tokens · {self.tokens_per_s:.1f} tokens/s · first token {ttft}" + ("" if self.done else " …")


class _Texts:
    """Receives one side's token ids as they come and keeps its reply's text, token count and timings."""

    def __init__(self, tokenizer, reply: Reply):
        self.tokenizer, self.reply = tokenizer, reply
        self.ids: list[int] = []

    def put(self, token: int) -> bool:
        self.ids.append(token)
        now = time.perf_counter() - self.reply.started
        if self.reply.first_token_s is None:
            self.reply.first_token_s = now
        self.reply.tokens = len(self.ids)
        self.reply.elapsed_s = now
        self.reply.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return True


def prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids for a conversation, with the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(text, return_tensors="pt").input_ids


def _decode_sides(sides: list[tuple], tokenizer, sampling: Sampling, stop: threading.Event, replies: list[Reply],
                  ignore_eos: bool) -> None:
    """Every side as a row of one decoder: each prompt alone, then one step for all of them until each ends."""
    decoder, rows = Decoder(), []
    try:
        for (model, messages), reply in zip(sides, replies, strict=True):
            try:
                row = decode_row(model, tokenizer, prompt_ids(tokenizer, messages)[0].tolist(), sampling,
                                 _Texts(tokenizer, reply).put, cancelled=stop.is_set, ignore_eos=ignore_eos)
                rows.append((row, reply))
                decoder.add(row)
            except Exception as exc:  # shown under this side's reply; the other side goes on
                reply.error = f"{type(exc).__name__}: {exc}"
        while decoder.rows and not stop.is_set():
            try:
                decoder.step()
            except Exception as exc:  # the sides still running fail
                for row, reply in rows:
                    if row in decoder.rows:
                        reply.error = f"{type(exc).__name__}: {exc}"
                decoder.rows = []
    finally:
        for reply in replies:
            reply.elapsed_s = time.perf_counter() - reply.started
            reply.done = True


def stream_pair(sides: list[tuple], tokenizer, sampling: Sampling, stop: threading.Event, every: float = 0.1, *,
                ignore_eos: bool = False):
    """Generate on every (model, messages) side at once; yield the list of Replies.

    The sides are rows of one `boomerang.decoding.Decoder`, decoded in one thread: each step, a layer both sides
    run (the teacher blocks a size has patched in, its student layers when the other side is a size too) is one
    call for both. Yields a snapshot at most every `every` seconds while any side runs, only when some reply's
    text changed (each yield re-renders both panes in the browser, which on a busy 2-core machine starved the
    page: a Stop click once waited a minute), and once more at the end. `ignore_eos`: every side goes on to
    max_new_tokens (for benchmarks).
    """
    replies = [Reply() for _ in sides]
    thread = threading.Thread(target=_decode_sides, args=(sides, tokenizer, sampling, stop, replies, ignore_eos),
                              daemon=True)
    thread.start()
    shown: list[str] | None = None
    while thread.is_alive():
        time.sleep(every)
        texts = [r.text for r in replies]
        if texts != shown:
            shown = texts
            yield replies
    yield replies


def decode_row(model, tokenizer, prompt: list[int], sampling: Sampling, on_token: Callable[[int], bool], *,
               cancelled: Callable[[], bool], ignore_eos: bool = False) -> DecodeRow:
    """A decoder row for `prompt` with these decoding settings; it ends at the model's end-of-sequence tokens unless
    `ignore_eos` (then at max_new_tokens)."""
    return DecodeRow(model, prompt, sampling.max_new_tokens, on_token, temperature=sampling.temperature,
                     top_p=sampling.top_p, seed=sampling.seed, cancelled=cancelled,
                     eos=set() if ignore_eos else eos_ids(model, tokenizer))


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


@torch.no_grad()
def prefill_ms(model, *, tokens: int = 128, repeats: int = 3) -> float:
    """Median time of one forward over a `tokens`-long prompt, in milliseconds (the latency a budget means)."""

    device = next(model.parameters()).device
    ids = torch.randint(10, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model(ids)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(ids)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
