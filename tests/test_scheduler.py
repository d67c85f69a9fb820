"""The server's scheduler on a tiny family: one continuous batch over every size, what it returns, its bounds."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from boomerang.decoding import Decoder, DecodeRow
from boomerang.family import Family
from boomerang.generation import Sampling
from boomerang.plan import LayerPlan
from boomerang.student import cut_student
from serve import scheduler as sched
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def family():
    teacher = tiny_model("llama")
    plan = LayerPlan.from_rule(8)
    student = cut_student(teacher, plan)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1.01)
    return Family(teacher, student, plan)


def alone(model, prompt, n):
    out: list[int] = []
    dec = Decoder()
    dec.add(DecodeRow(model, prompt, n, lambda t: out.append(t) or True))
    while dec.rows:
        dec.step()
    return out


class Tracked:
    """Jobs submitted to a scheduler and what each received."""

    def __init__(self, scheduler):
        self.scheduler, self.outs, self.done, self.first = scheduler, {}, {}, {}
        self.ended = threading.Condition()

    def submit(self, name, n_layers, prompt, sampling):
        self.outs[name] = []

        def on_token(t):
            self.first.setdefault(name, time.perf_counter())
            self.outs[name].append(t)
            return True

        def on_done(job):
            with self.ended:
                self.done[name] = (job, time.perf_counter())
                self.ended.notify_all()

        job = sched.Job(n_layers, prompt, sampling, on_token, on_done)
        self.scheduler.submit(job)
        return job

    def wait(self, *names, timeout=60):
        with self.ended:
            assert self.ended.wait_for(lambda: all(n in self.done for n in names), timeout)


def test_requests_of_every_size_and_setting_decode_together_and_return_what_they_return_alone(family):
    tok = tiny_tokenizer()
    s = sched.Scheduler(family.build, tok, max_queue=5, max_batch=8)
    t = Tracked(s)
    asks = {"a": (6, [5, 6, 7, 8]), "b": (8, [9, 10]), "c": (5, [11, 12, 13, 14, 15, 16]), "d": (6, [20, 21])}
    for name, (n, prompt) in asks.items():
        t.submit(name, n, prompt, Sampling(10, 0.0))
    t.submit("hot", 7, [30, 31, 32], Sampling(10, 0.8, 0.9, seed=3))  # sampling rows decode beside greedy ones
    with pytest.raises(sched.QueueFull, match="at most 5"):
        t.submit("over", 6, [1], Sampling(4, 0.0))
    t.wait(*asks, "hot")
    for name, (n, prompt) in asks.items():
        assert t.outs[name] == alone(family.build(n), prompt, 10), name
    assert len(t.outs["hot"]) == 10 and all(t.done[n][0].error is None for n in t.done)
    assert s.steps <= 12, "the five requests did not decode as one batch"  # 9 steps after the prompts, if together
    assert s.load() == {"waiting": 0, "running": 0, "max_queue": 5, "tokens_generated": 50}
    s.close()
    assert torch.is_grad_enabled()


def test_a_request_joins_the_running_batch_at_the_next_step(family):
    tok = tiny_tokenizer()
    s = sched.Scheduler(family.build, tok, max_batch=8)
    t = Tracked(s)
    t.submit("long", 8, [5, 6, 7], Sampling(100, 0.0))
    while len(t.outs["long"]) < 5:
        time.sleep(0.01)
    t.submit("late", 5, [40, 41], Sampling(5, 0.0))
    t.wait("late", "long", timeout=120)
    assert t.done["late"][1] < t.done["long"][1], "the late request waited for the running batch to finish"
    assert t.outs["late"] == alone(family.build(5), [40, 41], 5)
    assert t.outs["long"] == alone(family.build(8), [5, 6, 7], 100)
    s.close()


def test_past_max_batch_requests_wait_their_turn_and_a_failing_request_fails_alone(family):
    tok = tiny_tokenizer()

    def build(n):
        if n == 7:
            raise RuntimeError("no such size here")
        return family.build(n)

    s = sched.Scheduler(build, tok, max_batch=2)
    t = Tracked(s)
    for name in ("a", "b", "c"):
        t.submit(name, 6, [5, 6, ord(name) % 90], Sampling(6, 0.0))
    bad = t.submit("bad", 7, [5, 6], Sampling(6, 0.0))
    t.wait("a", "b", "c", "bad")
    assert bad.error == "RuntimeError: no such size here" and t.outs["bad"] == []
    # a prompt that breaks its size's forward pass (a token past the vocabulary) fails alone, not its batch
    s2 = sched.Scheduler(family.build, tok, max_batch=4)
    t2 = Tracked(s2)
    with s2.lock:  # both wait until both are queued: their prompts are one batch
        t2.submit("good", 6, [5, 6, 7], Sampling(6, 0.0))
        broken = t2.submit("broken", 6, [5, 6, 10_000], Sampling(6, 0.0))
    t2.wait("good", "broken")
    assert broken.error and "index" in broken.error and t2.outs["broken"] == []
    assert t2.done["good"][0].error is None and t2.outs["good"] == alone(family.build(6), [5, 6, 7], 6)
    s2.close()
    for name in ("a", "b", "c"):
        assert t.done[name][0].error is None and t.outs[name] == alone(family.build(6), [5, 6, ord(name) % 90], 6)
    assert s.load()["running"] == 0
    s.close()
