"""Models scored together (boomerang.evaluation.shared) against the references: each model scored alone by the
same code (bit for bit, in float32), and lm-eval's own scoring of the model."""

import random

import pytest
import torch
from test_family import make_family

from boomerang.evaluation.shared import SharedScorer, Stopped, model_path, plan_group, shared_lm
from boomerang.importance import dropped_teacher
from boomerang.student import cut_student
from tiny import CONFIGS, VOCAB, tiny_tokenizer


def requests(n_items=10, seed=0, choices=3):
    """Multiple-choice-like requests: a context per item, several continuations of 1 to 5 tokens (some items share
    a row: one-token continuations of one context)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_items):
        ctx = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 30))]
        for _ in range(choices):
            cont = [rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 1, 3, 5]))]
            out.append((("", ""), ctx, cont))
    return out


def the_group(model_type):
    """A family's sizes, its undistilled sizes and layer-dropped teachers: everything an evaluation scores together."""
    teacher, student, plan, fam = make_family(model_type, order=[2, 0, 1])  # sizes that share only some layers
    fresh_student = cut_student(teacher, plan, share=True)
    from boomerang.family import Family
    fresh = Family(teacher, fresh_student, plan)
    models = {f"size-{n}": fam.build(n) for n in fam.layer_counts}
    models |= {f"undistilled-{n}": fresh.build(n) for n in fresh.layer_counts[:-1]}
    models |= {"drop-7": dropped_teacher(teacher, [7]), "drop-6-7": dropped_teacher(teacher, [6, 7]),
               "drop-3": dropped_teacher(teacher, [3])}
    return models


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_a_group_scores_every_model_exactly_as_alone(model_type):
    models = the_group(model_type)
    reqs = requests()
    group = SharedScorer(models, batch_size=4)
    assert group.plan.layers_run < group.plan.layers_alone  # something is shared
    for key, model in models.items():
        alone = SharedScorer({key: model}, batch_size=4).loglikelihoods(key, reqs, max_length=64)
        assert group.loglikelihoods(key, reqs, max_length=64) == alone, key


def test_what_is_shared_and_what_is_not():
    models = the_group("llama")
    paths = {k: model_path(m) for k, m in models.items()}
    plan = plan_group(paths)
    # the dropped teachers share the teacher's layers up to the first one dropped; the drop at 3 shares 3 with them
    assert plan.resume["drop-6-7"] == 6 and plan.resume["drop-3"] == 3
    # a size of the family and a layer-dropped teacher share no embedding: nothing
    assert plan_group({k: paths[k] for k in ("size-5", "drop-7")}).resume["drop-7"] == 0
    # the teacher and the size with every block patched back are the same model
    n_teacher = max(int(k.split("-")[1]) for k in models if k.startswith("size-"))
    assert plan_group({"t": paths[f"size-{n_teacher}"], "u": paths["drop-7"]}).resume["u"] == n_teacher - 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_the_scorer_gives_lm_evals_own_numbers(model_type):
    from lm_eval.models.huggingface import HFLM

    models = the_group(model_type)
    reqs = requests(seed=1)
    group = SharedScorer(models, batch_size=4)
    tok = tiny_tokenizer()
    for key, model in list(models.items())[::3]:
        own = HFLM(pretrained=model, tokenizer=tok, batch_size=4, softmax_dtype=torch.float32, max_length=64)
        ref = own._loglikelihood_tokens(reqs, disable_tqdm=True)
        ours = group.loglikelihoods(key, reqs, max_length=64)
        assert [g for _, g in ours] == [g for _, g in ref], key
        torch.testing.assert_close(torch.tensor([x for x, _ in ours]), torch.tensor([x for x, _ in ref]),
                                   rtol=1e-5, atol=1e-5)


def test_rolling_loglikelihoods_and_long_inputs_cut_from_the_left_as_lm_eval_does():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    models = the_group("llama")
    tok = tiny_tokenizer()
    key = "size-6"
    text = "the quick brown fox jumps over the lazy dog, " * 4  # longer than max_length: several windows
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    own = HFLM(pretrained=models[key], tokenizer=tok, batch_size=4, max_length=32).loglikelihood_rolling(rolling)
    ours = shared_lm(SharedScorer(models, batch_size=4), key, tok, batch_size=4)
    ours._max_length = 32
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(own, abs=1e-4)
    long = [(("", ""), list(range(3, 60)), [5, 6, 7])]  # 60 tokens, max_length 32: cut from the left
    ref = HFLM(pretrained=models[key], tokenizer=tok, batch_size=4, max_length=32)._loglikelihood_tokens(long, disable_tqdm=True)
    assert SharedScorer(models).loglikelihoods(key, long, max_length=32)[0] == pytest.approx(ref[0], abs=1e-5)


def test_each_models_answers_are_handed_out_once_and_a_stop_between_batches_raises():
    models = the_group("llama")
    reqs = requests()
    group = SharedScorer(models, batch_size=4)
    first = group.loglikelihoods("size-5", reqs, max_length=64)
    assert group.loglikelihoods("size-5", reqs, max_length=64) == first  # asked again: scored again, same answers
    calls = iter([False, True])
    stopping = SharedScorer(models, batch_size=4, should_stop=lambda: next(calls))
    with pytest.raises(Stopped):
        stopping.loglikelihoods("size-5", reqs, max_length=64)
    assert not stopping._answers


def test_bad_requests_are_refused_with_their_index():
    models = the_group("llama")
    with pytest.raises(ValueError, match="request 1"):
        SharedScorer(models).loglikelihoods("size-5", [(("", ""), [4], [5]), (("", ""), [], [5])], max_length=64)
