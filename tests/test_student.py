"""Student folders: save, load, and the teacher check."""

import json

import pytest
from torch.testing import assert_close

from boomerang.errors import BoomerangError
from boomerang.models import Teacher, weights_fingerprint
from boomerang.plan import LayerPlan
from boomerang.student import MANIFEST, Manifest, cut_student, load_student, read_manifest, save_student
from tiny import N_LAYERS, tiny_model, tiny_tokenizer, tokens


def as_teacher(model, source="tiny"):
    return Teacher(model, tiny_tokenizer(), source, weights_fingerprint(model))


def test_cut_student_owns_copies_of_the_kept_layers():
    teacher = tiny_model("qwen2")
    plan = LayerPlan(N_LAYERS, (0, 3, 5, 7))
    student = cut_student(teacher, plan)
    assert student.config.num_hidden_layers == 4
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in plan.kept]
    for j, i in enumerate(plan.kept):
        assert_close(student.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight)
        assert student.model.layers[j].self_attn.layer_idx == j
    owned = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in owned for p in student.parameters())
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tying survives the copy
    shared = cut_student(teacher, plan, share=True)
    assert {p.data_ptr() for p in shared.parameters()} <= owned


def test_student_folder_round_trip(tmp_path):
    teacher_model = tiny_model("llama")
    teacher = as_teacher(teacher_model)
    plan = LayerPlan.from_rule(N_LAYERS)
    student = cut_student(teacher_model, plan)
    manifest = Manifest(teacher.source, teacher.fingerprint, plan)
    out = save_student(student, teacher.tokenizer, manifest, tmp_path / "student")
    data = json.loads((out / MANIFEST).read_text())
    assert data["plan"]["kept"] == [0, 2, 4, 6, 7]
    assert data["alignment"] == [[0, 1], [1, 3], [2, 5], [3, 6], [4, 7]]
    assert data["patch_orders"] == {"last": [2, 1, 0], "first": [0, 1, 2]}
    assert data["teacher"]["fingerprint"] == teacher.fingerprint and data["library_version"]
    loaded, m2 = load_student(out, teacher)
    assert m2.plan == plan
    assert_close(loaded(tokens()).logits, student(tokens()).logits, rtol=0, atol=0)


def test_loading_a_student_with_the_wrong_teacher_says_which_to_use(tmp_path):
    teacher = as_teacher(tiny_model("llama", seed=0), "teacher-a")
    plan = LayerPlan.from_rule(N_LAYERS)
    out = save_student(cut_student(teacher.model, plan), None, Manifest(teacher.source, teacher.fingerprint, plan),
                       tmp_path / "s")
    other = as_teacher(tiny_model("llama", seed=1), "teacher-b")
    with pytest.raises(BoomerangError, match="cut from teacher 'teacher-a'.*given is 'teacher-b'.*--teacher teacher-a"):
        load_student(out, other)


def test_bad_student_folders(tmp_path):
    with pytest.raises(BoomerangError, match="student folder not found"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BoomerangError, match="not a student folder: it has no boomerang.json"):
        read_manifest(tmp_path / "plain")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_text("{not json")
    with pytest.raises(BoomerangError, match="is damaged"):
        read_manifest(tmp_path / "broken")


def test_a_student_opened_for_use_holds_the_teacher_s_tensors_where_they_are_equal(tmp_path):
    """Ends and single-layer blocks left as cut (the `cpu` recipe freezes them) become the teacher's own tensors when
    a student folder is opened, a tied head included; what training changed stays the student's. Every size computes
    exactly what it did with a student owning every tensor, and a size decoded beside the teacher calls the shared
    blocks once for both rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from boomerang.decoding import Decoder, DecodeRow
    from boomerang.family import Family

    teacher_model = tiny_model("llama")
    teacher = as_teacher(teacher_model)
    plan = LayerPlan(N_LAYERS, (0, 1, 3, 5, 7))  # spans [0,1] [1,3] [3,5] [5,7] [7,8]: student layers 0 and 4 single
    student = cut_student(teacher_model, plan)
    with torch.no_grad():
        student.model.layers[4].mlp.up_proj.weight.add_(0.01)  # a single block training changed
        student.model.layers[1].mlp.up_proj.weight.add_(0.01)
        student.model.norm.weight.mul_(1.5)
    out = save_student(student, teacher.tokenizer, Manifest(teacher.source, teacher.fingerprint, plan), tmp_path / "s")
    loaded, _ = load_student(out, teacher)
    theirs = {id(t) for t in teacher_model.parameters()}

    def held(module):  # each of its tensors: the teacher's (True) or its own (False)
        return {name: id(p) in theirs for name, p in module.named_parameters()}

    assert all(held(loaded.model.embed_tokens).values()) and all(held(loaded.model.layers[0]).values())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight or all(held(loaded.lm_head).values())
    assert not any(held(loaded.model.norm).values())
    layer4 = held(loaded.model.layers[4])
    assert not layer4["mlp.up_proj.weight"] and layer4["mlp.down_proj.weight"], "only the equal tensors are shared"
    for j in (1, 2, 3):  # blocks of two teacher layers are never the teacher's
        assert not any(held(loaded.model.layers[j]).values())

    own = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokens()
    with torch.no_grad():
        for n in Family(teacher_model, own, plan).layer_counts:
            a = Family(teacher_model, loaded, plan).build(n)(ids).logits
            b = Family(teacher_model, own, plan).build(n)(ids).logits
            assert torch.equal(a, b), n

    def calls(student_model):
        size = Family(teacher_model, student_model, plan).build(plan.n_student + 1)
        dec = Decoder()
        dec.add_many([DecodeRow(m, [5, 6, 7], 4, lambda t: True) for m in (size, teacher_model)])
        while dec.rows:
            dec.step()
        return dec.layer_calls

    assert calls(loaded) == calls(own) - 3, "student layer 0 is the teacher's: one call for both rows, each of 3 steps"
