"""Requests in, batches out: requests for the same size (and decoding settings) that arrive together run
as one batch, one forward per step for all of them; different sizes run side by side on a few threads.

A request's tokens go to its own callback as they are made; a request whose client went away is
cancelled and leaves its batch at the next step. The number of requests waiting or running is bounded:
past it, `submit` raises `QueueFull` (the API answers 429).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from boomerang.generation import Row, Sampling, generate_rows


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request as the scheduler sees it."""

    n_layers: int
    prompt: list[int]
    sampling: Sampling
    on_token: Callable[[int], bool]
    """Receives each token; False stops this request."""
    on_done: Callable[["Job"], None]
    """Called once when the request ends (normally, stopped, cancelled, or failed)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: Row | None = None
    error: str | None = None

    def key(self) -> tuple:
        """Requests with the same key can share a batch: same size, same decoding (a seeded sample runs alone)."""
        s = self.sampling
        if s.temperature <= 0:
            return (self.n_layers, "greedy")
        return (self.n_layers, s.temperature, s.top_p, id(self) if s.seed else "unseeded")


class Scheduler:
    """Batches jobs by key; `workers` batches run at once (different sizes side by side)."""

    def __init__(self, build: Callable[[int], object], tokenizer, *, max_queue: int = 64, max_batch: int = 8,
                 window_s: float = 0.02, workers: int = 2):
        self.build, self.tokenizer = build, tokenizer
        self.max_queue, self.max_batch, self.window_s = max_queue, max_batch, window_s
        self.waiting: list[Job] = []
        self.running = 0
        self.tokens = 0
        """Tokens generated so far, over every request (a request that stopped adds no more)."""
        self.lock = threading.Condition()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch")
        self.busy_keys: set[tuple] = set()
        self.closed = False
        threading.Thread(target=self._dispatch, daemon=True, name="scheduler").start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) + self.running >= self.max_queue:
                raise QueueFull(f"{len(self.waiting) + self.running} requests are waiting or running "
                                f"(at most {self.max_queue}); try again shortly")
            self.waiting.append(job)
            self.lock.notify()

    def load(self) -> dict:
        with self.lock:
            return {"waiting": len(self.waiting), "running": self.running, "max_queue": self.max_queue,
                    "tokens_generated": self.tokens}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        """Take the oldest waiting job's key, wait a moment for more of the same, run them as one batch."""
        while True:
            with self.lock:
                while not self.closed and not any(j.key() not in self.busy_keys for j in self.waiting):
                    self.lock.wait()
                if self.closed:
                    return
            time.sleep(self.window_s)  # requests that arrive together share the batch
            with self.lock:
                free = [j for j in self.waiting if j.key() not in self.busy_keys]
                if not free:
                    continue
                key = free[0].key()
                batch = [j for j in free if j.key() == key][: self.max_batch]
                for j in batch:
                    self.waiting.remove(j)
                self.running += len(batch)
                self.busy_keys.add(key)
            self.pool.submit(self._run, key, batch)

    def _run(self, key: tuple, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled.is_set()]
        try:
            if live:
                for job in live:
                    job.row = Row(job.prompt, job.sampling.max_new_tokens, self._counted(job),
                                  cancelled=job.cancelled.is_set)
                generate_rows(self.build(key[0]), self.tokenizer, [j.row for j in live], live[0].sampling)
        except Exception as exc:  # the batch's requests fail; the server goes on
            for job in live:
                job.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self.lock:
                self.running -= len(batch)
                self.busy_keys.discard(key)
                self.lock.notify()
            for job in batch:
                job.on_done(job)

    def _counted(self, job: Job) -> Callable[[int], bool]:
        def on_token(token: int) -> bool:
            if job.cancelled.is_set():
                return False
            with self.lock:
                self.tokens += 1
            return job.on_token(token)
        return on_token
