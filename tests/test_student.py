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
