"""The server's scheduler on a tiny family: who shares a batch, what a batch returns, the queue's bound."""

from __future__ import annotations

import threading

import pytest
import torch

from boomerang.family import Family
from boomerang.generation import Row, Sampling, generate_rows
from boomerang.plan import LayerPlan
from boomerang.student import cut_student
from serve import scheduler as sched
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def family():
    teacher = tiny_model("llama")
    plan = LayerPlan.from_rule(8)
    return Family(teacher, cut_student(teacher, plan, share=True), plan)


def job(n_layers, prompt, sampling, done: list):
    out = []
    return sched.Job(n_layers, prompt, sampling, lambda t: out.append(t) or True,
                     lambda j: done.append((prompt, out))), out


def test_who_shares_a_batch():
    greedy, hot, seeded = Sampling(8, 0.0), Sampling(8, 0.7, 0.9), Sampling(8, 0.7, 0.9, seed=5)
    a, b = job(6, [1], greedy, [])[0], job(6, [2], greedy, [])[0]
    assert a.key() == b.key() and a.key() != job(7, [1], greedy, [])[0].key()  # same size and settings only
    assert job(6, [1], hot, [])[0].key() == job(6, [2], hot, [])[0].key()  # unseeded samples batch together
    assert job(6, [1], seeded, [])[0].key() != job(6, [2], seeded, [])[0].key()  # a seed holds only alone


def test_requests_that_arrive_together_run_as_one_batch_and_return_what_they_return_alone(family, monkeypatch):
    tok = tiny_tokenizer()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    alone = []
    for p in prompts:
        got = []
        generate_rows(family.build(6), tok, [Row(p, 10, lambda t, got=got: got.append(t) or True)], Sampling(10, 0.0))
        alone.append(got)
    calls = []
    real = sched.generate_rows
    monkeypatch.setattr(sched, "generate_rows", lambda model, tk, rows, s: calls.append(len(rows)) or real(model, tk, rows, s))
    s = sched.Scheduler(family.build, tok, max_queue=3, window_s=0.2)
    done, ended = [], threading.Event()
    outs = []
    for p in prompts:
        j, out = job(6, p, Sampling(10, 0.0), done)
        j.on_done = (lambda j, d=done: d.append(j) or (len(d) == 3 and ended.set()))
        outs.append(out)
        s.submit(j)
    with pytest.raises(sched.QueueFull, match="at most 3"):
        s.submit(job(6, [1], Sampling(4, 0.0), [])[0])
    assert ended.wait(60)
    assert calls == [3], "three requests of one size did not share one batch"
    assert outs == alone
    assert s.load() == {"waiting": 0, "running": 0, "max_queue": 3, "tokens_generated": sum(len(o) for o in outs)}
    s.close()
    assert torch.is_grad_enabled()
