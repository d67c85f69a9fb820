"""Streaming two models at once, each from its own thread, with one stop flag for both.

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
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

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


class _Collector(BaseStreamer):
    """Receives generated token ids (the prompt first, which it skips) and decodes incrementally."""

    def __init__(self, tokenizer, reply: Reply):
        self.tokenizer, self.reply, self.prompt_seen = tokenizer, reply, False
        self.ids: list[int] = []

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        now = time.perf_counter() - self.reply.started
        if self.reply.first_token_s is None:
            self.reply.first_token_s = now
        self.reply.tokens = len(self.ids)
        self.reply.elapsed_s = now
        self.reply.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def end(self):
        self.reply.elapsed_s = time.perf_counter() - self.reply.started


class _StopOn(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return self.event.is_set()


def prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids for a conversation, with the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(text, return_tensors="pt").input_ids


def _generate(model, tokenizer, ids, sampling: Sampling, stop: threading.Event, reply: Reply) -> None:
    try:
        torch.manual_seed(sampling.seed)
        with torch.no_grad():
            model.generate(ids.to(next(model.parameters()).device), attention_mask=torch.ones_like(ids),
                           max_new_tokens=sampling.max_new_tokens, streamer=_Collector(tokenizer, reply),
                           stopping_criteria=StoppingCriteriaList([_StopOn(stop)]),
                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling.generate_kwargs())
    except Exception as exc:  # shown under the reply; the other side goes on
        reply.error = f"{type(exc).__name__}: {exc}"
    finally:
        reply.done = True


def stream_pair(sides: list[tuple], tokenizer, sampling: Sampling, stop: threading.Event, every: float = 0.1):
    """Generate on every (model, messages) side at once, one thread each; yield the list of Replies.

    Yields a snapshot at most every `every` seconds while any side runs, only when some reply's text
    changed (each yield re-renders both panes in the browser, which on a busy 2-core machine starved the
    page: a Stop click once waited a minute), and once more at the end.
    """
    replies = [Reply() for _ in sides]
    threads = [threading.Thread(target=_generate, daemon=True,
                                args=(model, tokenizer, prompt_ids(tokenizer, messages), sampling, stop, reply))
               for (model, messages), reply in zip(sides, replies, strict=False)]
    for t in threads:
        t.start()
    shown: list[str] | None = None
    while any(t.is_alive() for t in threads):
        time.sleep(every)
        texts = [r.text for r in replies]
        if texts != shown:
            shown = texts
            yield replies
    yield replies


# ----------------------------------------------------------------------------- several requests in one batch


@dataclass
class Row:
    """One sequence of a batch: its prompt, its own token limit, and where its tokens go.

    `on_token(token_id)` receives each new token (never the end-of-sequence token) and returns False
    to stop the row; `cancelled()` is asked before every step (a client that went away).
    """

    prompt: list[int]
    max_new_tokens: int
    on_token: Callable[[int], bool]
    cancelled: Callable[[], bool] = lambda: False
    generated: int = 0
    """Tokens this row generated, the end-of-sequence token included."""
    finished: bool = False
    reason: str = "length"
    """Why the row ended: "stop" (end of sequence, or its consumer stopped it), "length", "cancelled"."""


class _RowStreamer(BaseStreamer):
    """Hands each step's tokens (B,) to their rows; tokens after a row has finished are padding."""

    def __init__(self, rows: list[Row], eos: set[int]):
        self.rows, self.eos, self.prompt_seen = rows, eos, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=False):
            if row.finished:
                continue
            row.generated += 1
            if token in self.eos:
                row.finished, row.reason = True, "stop"
            elif not row.on_token(token):
                row.finished, row.reason = True, "stop"
            elif row.generated >= row.max_new_tokens:
                row.finished, row.reason = True, "length"

    def end(self):
        for row in self.rows:
            row.finished = True


class _RowsDone(StoppingCriteria):
    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        for row in self.rows:
            if not row.finished and row.cancelled():
                row.finished, row.reason = True, "cancelled"
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[Row], sampling: Sampling) -> None:
    """Generate for every row in one batch: prompts left-padded, one forward per step for all of them.

    Rows stop on their own (end of sequence, their token limit, their consumer, a cancel); the batch ends
    when every row has. With sampling, `sampling.seed` seeds the batch.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), left-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row.prompt):] = torch.tensor(row.prompt)
        mask[b, width - len(row.prompt):] = 1
    device = next(model.parameters()).device
    torch.manual_seed(sampling.seed)
    model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(r.max_new_tokens for r in rows),
                   streamer=_RowStreamer(rows, eos_ids(model, tokenizer)),
                   stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]), pad_token_id=pad,
                   **sampling.generate_kwargs())


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
