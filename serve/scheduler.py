"""Requests in, tokens out: every running request, of any size, is a row of one continuous batch.

A request waits at most for the step under way: between steps, waiting requests join (each one's prompt runs alone
and its first token goes out at once) and finished ones leave. Each step makes one token for every row, and rows of
different sizes share the calls of the layers their sizes have in common (`boomerang.decoding`). At most `max_batch`
rows decode at once; the others wait their turn in arrival order.

A request's tokens go to its own callback as they are made; a request whose client went away is cancelled and
leaves at the next step. The number of requests waiting or running is bounded: past it, `submit` raises `QueueFull`
(the API answers 429). A failure fails the requests it touched (a prompt: its own request; a step: the rows of that
step) and the server goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from boomerang.decoding import Decoder, DecodeRow
from boomerang.generation import Sampling, decode_row


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
    ignore_eos: bool = False
    """Go on past end-of-sequence tokens to max_new_tokens (vLLM's extension; for benchmarks)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: DecodeRow | None = None
    """Its row in the batch, once its prompt has run (None for a request cancelled or failed before)."""
    error: str | None = None


class Scheduler:
    """Decodes every running job in one loop, one step at a time (see the module's docstring)."""

    def __init__(self, build: Callable[[int], object], tokenizer, *, max_queue: int = 64, max_batch: int = 8):
        self.build, self.tokenizer = build, tokenizer
        self.max_queue, self.max_batch = max_queue, max_batch
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.tokens = 0
        """Tokens generated so far, over every request (a request that stopped adds no more)."""
        self.steps = 0
        self.lock = threading.Condition()
        self.decoder = Decoder()
        self.closed = False
        threading.Thread(target=self._loop, daemon=True, name="decoder").start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) + len(self.running) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting) + len(self.running)} requests are waiting or running "
                                f"(at most {self.max_queue}); try again shortly")
            self.waiting.append(job)
            self.lock.notify()

    def load(self) -> dict:
        with self.lock:
            return {"waiting": len(self.waiting), "running": len(self.running), "max_queue": self.max_queue,
                    "tokens_generated": self.tokens}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()

    # ------------------------------------------------------------------------- the decode loop

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not self.running:
                    self.lock.wait()
                if self.closed:
                    return
                joining = self.waiting[: self.max_batch - len(self.running)]
                del self.waiting[: len(joining)]
                self.running.extend(joining)
            self._start(joining)
            if self.decoder.rows:
                try:
                    self.decoder.step()
                    self.steps += 1
                except Exception as exc:  # the step's requests fail; the server goes on
                    for row in self.decoder.rows:
                        row.finished, row.reason = True, "error"
                    self._fail([j for j in self.running if j.row in self.decoder.rows], exc)
                    self.decoder.rows = []
            self._end_finished()

    def _start(self, jobs: list[Job]) -> None:
        """The jobs' prompts (those of one size as one batch): their first tokens, and their rows in the batch from
        the next step. When a batch of prompts fails, each runs alone, so that a bad one fails only its request."""
        rows = {}
        for job in jobs:
            if job.cancelled.is_set():
                continue  # no row: it ends with the step
            try:
                rows[id(job)] = self._row(job)
            except Exception as exc:  # this request fails (it has no row); the others go on
                self._fail([job], exc)
        try:
            self.decoder.add_many(list(rows.values()))
        except Exception:  # a batch of prompts failed: those not run yet, one at a time
            for job in jobs:
                if id(job) in rows:
                    if rows[id(job)].generated:  # its batch ran before the failing one
                        job.row = rows[id(job)]
                    else:
                        self._start_alone(job, rows[id(job)])
            return
        for job in jobs:
            job.row = rows.get(id(job))

    def _start_alone(self, job: Job, row: DecodeRow) -> None:
        row.kv.clear()
        try:
            self.decoder.add(row)
            job.row = row
        except Exception as exc:
            self._fail([job], exc)

    def _row(self, job: Job) -> DecodeRow:
        return decode_row(self.build(job.n_layers), self.tokenizer, job.prompt, job.sampling, self._counted(job),
                          cancelled=job.cancelled.is_set, ignore_eos=job.ignore_eos)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            job.error = f"{type(exc).__name__}: {exc}"

    def _end_finished(self) -> None:
        with self.lock:
            done = [j for j in self.running if j.row is None or j.row.finished]
            self.running = [j for j in self.running if j not in done]
            self.lock.notify()
        for job in done:
            job.on_done(job)

    def _counted(self, job: Job) -> Callable[[int], bool]:
        def on_token(token: int) -> bool:
            if job.cancelled.is_set():
                return False
            with self.lock:
                self.tokens += 1
            return job.on_token(token)
        return on_token
