"""Label-free metrics against hand-computed references."""

import math

import pytest
import torch
from test_family import make_family

from boomerang.evaluation.metrics import family_label_free, label_free
from tiny import tokens


def test_the_teacher_against_itself():
    teacher, student, plan, fam = make_family("llama")
    blocks = tokens(3, 10)
    r = label_free(teacher, teacher, blocks, batch_size=2)
    assert r.kl_to_teacher == pytest.approx(0, abs=1e-6) and r.top1_agreement == 1 and r.tokens == 27
    logp = torch.log_softmax(teacher(blocks).logits[:, :-1], -1)
    nll = -logp.gather(-1, blocks[:, 1:].unsqueeze(-1)).mean()
    assert r.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_every_size_is_measured_and_the_largest_is_the_teacher():
    teacher, student, plan, fam = make_family("llama")
    results = family_label_free(fam, tokens(2, 10))
    assert [r.n_layers for r in results] == fam.layer_counts
    assert results[-1].kl_to_teacher == pytest.approx(0, abs=1e-6)
    assert results[0].kl_to_teacher > 0 and results[0].top1_agreement < 1
