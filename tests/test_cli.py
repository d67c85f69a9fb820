"""The `boomerang` commands end to end on a tiny local teacher folder."""

import json

import pytest
from transformers import AutoModelForCausalLM

from boomerang.cli import main
from tiny import save_tiny_teacher


@pytest.fixture
def teacher_dir(tmp_path):
    save_tiny_teacher(tmp_path / "teacher", "llama")
    return str(tmp_path / "teacher")


def test_family_json_for_a_fresh_cut(teacher_dir, capsys):
    assert main(["family", "--teacher", teacher_dir, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["kept"] == [0, 2, 4, 6, 7]
    assert [s["n_layers"] for s in data["sizes"]] == [5, 6, 7, 8]
    assert data["order"] == [2, 1, 0]


def test_family_table_with_explicit_plan_and_order(teacher_dir, capsys):
    assert main(["family", "--teacher", teacher_dir, "--keep", "0,3,6", "--order", "first"]) == 0
    out = capsys.readouterr().out
    assert "kept     [0, 3, 6]" in out and "order    [0, 1, 2]" in out
    assert "S0-2 (student)" in out and "T0-7 (teacher)" in out


def test_cut_export_generate(teacher_dir, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["cut", "--teacher", teacher_dir, "--out", str(student)]) == 0
    assert (student / "boomerang.json").is_file()
    assert "wrote the 5-layer student" in capsys.readouterr().out
    # the student knows its teacher: no --teacher needed from here on
    assert main(["family", "--student", str(student), "--order", "greedy", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(data["order"]) == [0, 1, 2]
    out = tmp_path / "size7"
    assert main(["export", "--student", str(student), "--layers", "7", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 7
    assert main(["generate", "--student", str(student), "--layers", "6", "--prompt", "hello", "--greedy",
                 "--max-new-tokens", "5"]) == 0
    assert "[6 layers: 5 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["family", "--teacher", "./nope"], "teacher folder not found"),
    (["family", "--keep", "1,2"], "must keep layer 0"),
    (["family", "--every", "0"], "--every must be at least 1"),
    (["export", "--student", "/no/student", "--layers", "5", "--out", "/tmp/x-out"], "student folder not found"),
    (["family", "--teacher", "Org/missing-model"], "could not load teacher 'Org/missing-model'"),
])
def test_bad_input_exits_2_with_the_message(argv, message, teacher_dir, capsys):
    argv = [a if a != "TEACHER" else teacher_dir for a in argv]
    if "--keep" in argv or "--every" in argv:
        argv += ["--teacher", teacher_dir]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cut_refuses_a_non_empty_folder_before_loading(teacher_dir, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep me")
    assert main(["cut", "--teacher", teacher_dir, "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "x.txt").read_text() == "keep me"


def test_export_a_size_the_family_lacks(teacher_dir, tmp_path, capsys):
    student = tmp_path / "student"
    main(["cut", "--teacher", teacher_dir, "--out", str(student)])
    assert main(["export", "--student", str(student), "--layers", "12", "--out", str(tmp_path / "o")]) == 2
    assert "no size with 12 layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_heldout_lists_every_size(teacher_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Some held-out text for the tiny model. " * 40)
    assert main(["heldout", "--teacher", teacher_dir, "--data", str(tmp_path / "text.txt"), "--seq-len", "16",
                 "--tokens", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["n_layers"] for s in data["sizes"]] == [5, 6, 7, 8] and data["tokens"] == 64
    assert data["sizes"][-1]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)


def test_recipes_cpu_by_default_on_a_cpu_paper_when_asked_flags_on_top(tmp_path):
    from boomerang.cli import build_parser, distill_config_from_args
    from boomerang.training.recipe import DistillConfig, named_recipe

    parser = build_parser()

    def cfg(*argv, **kw):
        return distill_config_from_args(parser.parse_args(["distill", "--out", str(tmp_path / "r"), *argv]), **kw)

    paper, cpu = DistillConfig(), DistillConfig.from_dict(named_recipe("cpu"))
    assert named_recipe("cpu") and cpu != paper
    assert cfg("--device", "cpu") == DistillConfig.from_dict({**named_recipe("cpu"), "out": str(tmp_path / "r"),
                                                             "device": "cpu"})
    assert cfg("--device", "cpu", "--recipe", "paper").kl_weight == paper.kl_weight
    assert cfg("--device", "cpu", default_recipe="paper").ce_weight == paper.ce_weight  # what `submit` does
    assert cfg("--device", "cpu", "--kl-weight", "0.5").kl_weight == 0.5  # a flag beats the recipe
    (tmp_path / "mine.json").write_text(json.dumps({"steps": 7}))
    assert cfg("--recipe", str(tmp_path / "mine.json")).steps == 7
