"""Exported sizes reload with plain transformers to the same logits; output folders are safe."""

import json

import pytest
from test_family import ARCHES, make_family
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from boomerang.errors import BoomerangError
from boomerang.export import export_model, export_size
from tiny import tokens


def reload(folder, like):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=like.config._attn_implementation).eval()


@pytest.mark.parametrize("model_type", ARCHES)
def test_exported_size_reloads_to_identical_logits(model_type, tmp_path):
    teacher, student, plan, fam = make_family(model_type)
    n = fam.layer_counts[1]
    out = export_size(fam, n, tmp_path / "size", teacher_source="tiny", student_source="tiny-student")
    loaded = reload(out, teacher)
    x = tokens()
    assert loaded.config.num_hidden_layers == n
    assert_close(loaded(x).logits, fam.build(n)(x).logits, rtol=0, atol=0)
    types = getattr(teacher.config, "layer_types", None)
    if types is not None:
        expected = [types[int(name[1:])] if name[0] == "T" else student.config.layer_types[int(name[1:])]
                    for name in fam.info(n).layers]
        assert loaded.config.layer_types == expected
    meta = json.loads((out / "boomerang-size.json").read_text())
    assert meta["n_layers"] == n and meta["patched"] == list(fam.patched_for(n))
    assert "tiny-student" in (out / "README.md").read_text()


def test_mixed_ends_export_untied_and_reload_identical(tmp_path):
    teacher, student, plan, fam = make_family("llama")
    mixed = fam.build_patched({1}, embeddings="student", head="teacher")
    out = export_model(mixed, tmp_path / "mixed")
    loaded = reload(out, teacher)
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert_close(loaded.lm_head.weight, teacher.lm_head.weight, rtol=0, atol=0)
    assert_close(loaded.model.embed_tokens.weight, student.model.embed_tokens.weight, rtol=0, atol=0)
    x = tokens()
    assert_close(loaded(x).logits, mixed(x).logits, rtol=0, atol=0)


def test_output_path_checks(tmp_path):
    teacher, student, plan, fam = make_family("llama")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BoomerangError, match="exists and is a file"):
        export_size(fam, 6, tmp_path / "afile")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(BoomerangError, match="already exists and is not empty.*--overwrite"):
        export_size(fam, 6, busy)
    with pytest.raises(BoomerangError, match="does not hold a model.*refusing to replace it"):
        export_size(fam, 6, busy, overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    with pytest.raises(BoomerangError, match="parent folder .* does not exist"):
        export_size(fam, 6, tmp_path / "no" / "such" / "dir")
    with pytest.raises(BoomerangError, match="no size with 99 layers"):
        export_size(fam, 99, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "busy"], "a temporary folder was left behind"


def test_overwrite_replaces_a_model_folder_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    teacher, student, plan, fam = make_family("llama")
    out = export_size(fam, 6, tmp_path / "size")
    export_size(fam, 7, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 7

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(fam.student), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export_size(fam, 6, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["size"]
    loaded = reload(out, teacher)
    assert_close(loaded(tokens()).logits, fam.build(7)(tokens()).logits, rtol=0, atol=0)


def test_export_takes_the_ends_asked_for_and_its_card_says_so(tmp_path, capsys):
    import torch

    from boomerang.cli import main
    from boomerang.student import open_family
    from tiny import save_tiny_teacher

    save_tiny_teacher(tmp_path / "teacher", "llama")
    assert main(["cut", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")]) == 0
    # a student whose final norm differs from the teacher's, so whose ends a size uses shows in its logits
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "student")
    # last-k: the first size past the student patches the top block, so "auto" gives it the teacher's head
    n = open_family(tmp_path / "student", order="last").family.layer_counts[1]
    assert main(["export", "--student", str(tmp_path / "student"), "--layers", str(n), "--ends", "auto",
                 "--order", "last", "--out", str(tmp_path / "auto")]) == 0
    x = tokens()
    expected = open_family(tmp_path / "student", ends="auto", order="last").family.build(n)(x).logits
    assert_close(reload(tmp_path / "auto", model)(x).logits, expected, rtol=0, atol=0)
    plain = open_family(tmp_path / "student", order="last").family.build(n)(x).logits
    assert not torch.allclose(plain, expected)
    assert "embeddings from the student, final norm and head from the teacher" in (tmp_path / "auto" / "README.md").read_text()
    capsys.readouterr()
    assert main(["family", "--student", str(tmp_path / "student"), "--ends", "middle"]) == 2
    assert "ends must be one of student, teacher, auto, got 'middle'" in capsys.readouterr().err
