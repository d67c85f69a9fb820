"""The family against its references, on a tiny random model of every supported architecture."""

import threading

import pytest
import torch
from torch.testing import assert_close

from boomerang.errors import BoomerangError
from boomerang.family import Family, greedy_patch_order, mean_kl
from boomerang.plan import LayerPlan
from boomerang.student import cut_student
from tiny import CONFIGS, N_LAYERS, tiny_model, tokens

ARCHES = list(CONFIGS)


def make_family(model_type, order="last", perturb=True):
    """A teacher and a student whose every weight (layers and ends) differs from the teacher's."""
    teacher = tiny_model(model_type)
    plan = LayerPlan.from_rule(N_LAYERS)
    student = cut_student(teacher, plan)
    if perturb:
        torch.manual_seed(123)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return teacher, student, plan, Family(teacher, student, plan, order=order)


@pytest.mark.parametrize("model_type", ARCHES)
def test_patching_every_block_reproduces_the_teacher(model_type):
    teacher, student, plan, fam = make_family(model_type)
    x = tokens()
    full = fam.build_patched(range(plan.n_student), embeddings="teacher", head="teacher")
    assert_close(full(x).logits, teacher(x).logits, rtol=0, atol=0)
    assert_close(fam.build(N_LAYERS)(x).logits, teacher(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ARCHES)
def test_patching_nothing_is_the_student(model_type):
    teacher, student, plan, fam = make_family(model_type)
    x = tokens()
    assert_close(fam.build(plan.n_student)(x).logits, student(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ARCHES)
def test_generate_works_on_every_size_with_the_kv_cache(model_type):
    teacher, student, plan, fam = make_family(model_type)
    prompt = tokens(1, 10)
    for n in fam.layer_counts:
        size = fam.build(n)
        with_cache = size.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        without = size.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(with_cache, without), f"{n}-layer size: the KV cache changed the output"


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen2", "gpt2"])
def test_a_middle_size_equals_the_same_model_built_by_hand(model_type):
    """Reference: run the layer sequence by hand with the teacher's own modules."""
    teacher, student, plan, fam = make_family(model_type)
    n = fam.layer_counts[2]
    size = fam.build(n)
    x = tokens()
    # compare layer by layer through hooks: every position runs the intended module's weights
    info = fam.info(n)
    runs = [(teacher if name[0] == "T" else student, int(name[1:])) for name in info.layers]
    arch = fam.arch
    for pos, (src, idx) in enumerate(runs):
        ours, theirs = arch.layer_list(size)[pos], arch.layer_list(src)[idx]
        assert [p.data_ptr() for p in ours.parameters()] == [p.data_ptr() for p in theirs.parameters()]
    assert size(x).logits.shape == (2, x.shape[1], teacher.config.vocab_size)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_sizes_share_weights_and_leave_teacher_and_student_untouched(model_type):
    teacher, student, plan, fam = make_family(model_type)
    owned = {p.data_ptr() for p in teacher.parameters()} | {p.data_ptr() for p in student.parameters()}
    before = [getattr(layer.self_attn, "layer_idx", None) for layer in fam.arch.layer_list(teacher)]
    sizes = [fam.build(n) for n in fam.layer_counts]
    for size in sizes:
        assert {p.data_ptr() for p in size.parameters()} <= owned, "a size copied a weight"
        for pos, layer in enumerate(fam.arch.layer_list(size)):
            assert layer.self_attn.layer_idx == pos
    after = [getattr(layer.self_attn, "layer_idx", None) for layer in fam.arch.layer_list(teacher)]
    assert before == after == list(range(N_LAYERS))
    assert teacher.config.num_hidden_layers == N_LAYERS and student.config.num_hidden_layers == plan.n_student


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_a_size_and_the_teacher_generate_side_by_side_in_two_threads(model_type):
    teacher, student, plan, fam = make_family(model_type)
    size = fam.build(fam.layer_counts[1])
    prompt = tokens(1, 10)
    alone = {name: m.generate(prompt, max_new_tokens=24, do_sample=False) for name, m in
             (("teacher", teacher), ("size", size))}
    results, barrier = {}, threading.Barrier(2)

    def run(name, model):
        barrier.wait()
        for _ in range(3):
            results.setdefault(name, []).append(model.generate(prompt, max_new_tokens=24, do_sample=False))

    threads = [threading.Thread(target=run, args=a) for a in (("teacher", teacher), ("size", size))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for name in alone:
        for out in results[name]:
            assert torch.equal(out, alone[name]), f"{name} changed while the other generated"


def test_tied_embeddings_stay_untied_when_ends_are_mixed():
    teacher, student, plan, fam = make_family("llama")
    assert teacher.config.tie_word_embeddings
    mixed = fam.build_patched({1}, embeddings="student", head="teacher")
    assert mixed.lm_head.weight is teacher.lm_head.weight
    assert mixed.model.embed_tokens.weight is student.model.embed_tokens.weight
    assert mixed.lm_head.weight is not mixed.model.embed_tokens.weight
    assert mixed.config.tie_word_embeddings is False
    assert student.config.tie_word_embeddings and teacher.config.tie_word_embeddings  # sources untouched
    assert fam.build(fam.layer_counts[1]).config.tie_word_embeddings is True


def test_patch_orders():
    teacher, student, plan, fam = make_family("llama")
    assert plan.patchable == (0, 1, 2)
    assert fam.order == (2, 1, 0)
    assert Family(teacher, student, plan, order="first").order == (0, 1, 2)
    assert Family(teacher, student, plan, order=[1, 0, 2]).order == (1, 0, 2)
    assert fam.layer_counts == [5, 6, 7, 8]
    assert fam.info(6).layers == ("S0", "S1", "T4", "T5", "S3", "S4")
    with pytest.raises(BoomerangError, match="permutation of \\[0, 1, 2\\]"):
        Family(teacher, student, plan, order=[1, 2])
    with pytest.raises(BoomerangError, match="unknown patch order 'middle'"):
        Family(teacher, student, plan, order="middle")
    with pytest.raises(BoomerangError, match="no size with 9 layers in this family: sizes are 5..8"):
        fam.build(9)


def test_greedy_order_picks_the_closest_block_first():
    teacher, student, plan, fam = make_family("llama")
    x = tokens(2, 16)
    order = greedy_patch_order(teacher, student, plan, x)
    assert sorted(order) == list(plan.patchable)
    ref = teacher(x).logits
    kl = {j: mean_kl(ref, fam.build_patched({j})(x).logits) for j in plan.patchable}
    assert order[0] == min(kl, key=kl.get)
    second = {j: mean_kl(ref, fam.build_patched({order[0], j})(x).logits) for j in plan.patchable if j != order[0]}
    assert order[1] == min(second, key=second.get)


def test_reverse_greedy_order_takes_back_the_cheapest_block_first():
    from boomerang.family import reverse_greedy_patch_order

    teacher, student, plan, fam = make_family("llama")
    x = tokens(2, 16)
    order = reverse_greedy_patch_order(teacher, student, plan, x)
    assert sorted(order) == list(plan.patchable)
    ref = teacher(x).logits
    every = set(plan.patchable)
    kl = {j: mean_kl(ref, fam.build_patched(every - {j})(x).logits) for j in plan.patchable}
    assert order[-1] == min(kl, key=kl.get)  # taken back first: patched last
    nxt = {j: mean_kl(ref, fam.build_patched(every - {order[-1], j})(x).logits) for j in plan.patchable if j != order[-1]}
    assert order[-2] == min(nxt, key=nxt.get)


def test_size_info_parameter_counts():
    teacher, student, plan, fam = make_family("llama")
    total_teacher = sum(p.numel() for p in teacher.parameters())
    sizes = fam.sizes()
    assert sizes[-1].params == total_teacher and sizes[-1].is_teacher
    assert sizes[0].params == sum(p.numel() for p in student.parameters()) and sizes[0].is_student
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    assert [s.params for s in sizes] == [sizes[0].params + k * per_layer for k in range(len(sizes))]
    embed = teacher.model.embed_tokens.weight.numel()
    assert sizes[-1].params_no_embed == total_teacher - embed


def test_mismatched_student_is_refused():
    teacher = tiny_model("llama")
    plan = LayerPlan.from_rule(N_LAYERS)
    other = cut_student(teacher, LayerPlan(N_LAYERS, (0, 4)))
    with pytest.raises(BoomerangError, match="plan is for a 8-layer teacher and 5-layer student, got 8 and 2"):
        Family(teacher, other, plan)


@pytest.mark.parametrize("order", ["last", "first"])
def test_ends_say_whose_embeddings_and_head_every_size_uses(order):
    teacher, student, plan, _ = make_family("llama")
    emb = {"teacher": teacher.model.embed_tokens.weight, "student": student.model.embed_tokens.weight}
    head = {"teacher": teacher.lm_head.weight, "student": student.lm_head.weight}
    norm = {"teacher": teacher.model.norm.weight, "student": student.model.norm.weight}
    # the reference code's convention: teacher ends on the patched side (last-k: the head, first-k: embeddings)
    auto = ("student", "teacher") if order == "last" else ("teacher", "student")
    for ends, expected in [("student", ("student", "student")), ("teacher", ("teacher", "teacher")), ("auto", auto)]:
        fam = Family(teacher, student, plan, order=order, ends=ends)
        counts = fam.layer_counts
        for n in counts[1:-1]:
            size = fam.build(n)
            assert size.model.embed_tokens.weight is emb[expected[0]], (ends, n)
            assert size.lm_head.weight is head[expected[1]] and size.model.norm.weight is norm[expected[1]], (ends, n)
            assert fam.info(n).params == sum(p.numel() for p in {id(p): p for p in size.parameters()}.values())
        assert fam.build(counts[0]).lm_head.weight is student.lm_head.weight  # the student stays itself
        assert fam.build(counts[-1]) is teacher
    x = tokens()
    # a size with only the middle block patched, under auto: neither end is on the patched side
    fam = Family(teacher, student, plan, order=[1, 0, 2], ends="auto")
    assert_close(fam.build(6)(x).logits, fam.build_patched({1}, embeddings="student", head="student")(x).logits,
                 rtol=0, atol=0)
    with pytest.raises(BoomerangError, match="ends must be one of student, teacher, auto, got 'middle'"):
        Family(teacher, student, plan, ends="middle")


def test_teacher_ends_with_every_block_patched_reproduce_the_teacher():
    teacher, student, plan, _ = make_family("gemma2")
    x = tokens()
    fam = Family(teacher, student, plan, ends="teacher")
    assert_close(fam.build_patched(range(plan.n_student))(x).logits, teacher(x).logits, rtol=0, atol=0)
