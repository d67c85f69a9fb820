"""The family's patch order: the best measured size by size, chosen once, kept in the student folder, and used by
every path that builds a size (evaluation, chat, serving, export, the distilled-at-size baselines)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from app.services import ModelCache
from boomerang import student as student_module
from boomerang.cli import main
from boomerang.errors import BoomerangError
from boomerang.evaluation.run import EvalRequest
from boomerang.export import ExportRequest, run_export
from boomerang.family import BestSizes, Family, best_schedule, check_schedule, greedy_patch_order, kl_on, schedule_of
from boomerang.plan import LayerPlan
from boomerang.student import MANIFEST, cut_student, open_family, read_manifest
from boomerang.training.at_size import at_size_configs, implied_keep
from serve.cli import register
from tiny import save_tiny_teacher, tiny_model, tokens

PLAN = LayerPlan(8, (0, 2, 4, 6, 7))  # blocks: student 0 = teacher 0-1, 1 = 2-3, 2 = 4-5; patchable 0, 1, 2


def planted_teacher(folder: Path | None = None):
    """A tiny teacher whose blocks 0 and 2 cost nothing to drop (teacher layers 1 and 5 pass their input through):
    in the freshly cut student only block 1 differs from the teacher, so patching it first is exact."""
    model = save_tiny_teacher(folder, "llama") if folder else tiny_model("llama")
    for i in (1, 5):
        layer = model.model.layers[i]
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    if folder:
        model.save_pretrained(folder)
    return model


def test_greedy_picks_first_the_block_whose_removal_costs_something_and_the_best_size_is_exact():
    teacher = planted_teacher()
    student = cut_student(teacher, PLAN, share=True)
    x = [tokens(2, 16)]
    order = greedy_patch_order(teacher, student, PLAN, x)
    assert order[0] == 1
    candidates = {"last": (2, 1, 0), "first": (0, 1, 2), "greedy": order}
    best = best_schedule(teacher, student, PLAN, x, candidates)
    assert best.schedule[6] == (1,) and best.chosen[6] == "greedy"
    assert best.kl[6]["greedy"] < 1e-6 < best.kl[6]["last"] and best.kl[6]["first"] > 1e-6
    fam = Family(teacher, student, PLAN, order=best.schedule)
    torch.testing.assert_close(fam.build(6)(x[0]).logits, teacher(x[0]).logits, rtol=0, atol=1e-5)
    for n, kls in best.kl.items():  # never worse than last-k on the text it was chosen on
        assert kls[best.chosen[n].split("+")[0]] <= kls["last"] + 1e-9
        assert set(kls) == {"last", "first", "greedy"}


def test_the_best_of_several_orders_keeps_the_first_ones_sizes_and_lists_the_others():
    teacher = tiny_model("llama")
    plan = LayerPlan(8, (0, 3, 5, 6, 7))  # blocks of 3 and 2 teacher layers: last-k reaches 6, first-k 7
    student = cut_student(teacher, plan, share=True)
    x = [tokens(2, 16)]
    best = best_schedule(teacher, student, plan, x, {"last": (1, 0), "first": (0, 1)})
    assert sorted(best.schedule) == [5, 6, 8] and list(best.left_out) == [7]
    assert best.left_out[7].startswith("--order first builds it (KL ")
    fam = Family(teacher, student, plan, order=best.schedule)
    assert fam.order is None and fam.layer_counts == [5, 6, 8] and fam.patched_for(6) == (1,)
    assert kl_on(fam, fam.patched_for(6), x, [teacher(x[0]).logits]) == pytest.approx(best.kl[6]["last"])
    with pytest.raises(BoomerangError, match="size 6: patching \\[0\\] gives 7 layers, not 6"):
        check_schedule(plan, {5: [], 6: [0], 8: [0, 1]})
    with pytest.raises(BoomerangError, match="must hold the student"):
        check_schedule(plan, {6: [1], 8: [0, 1]})
    assert schedule_of(plan, (0, 1)) == {5: (), 7: (0,), 8: (0, 1)}


@pytest.fixture
def folder(tmp_path):
    """A freshly cut student of the planted teacher, saved as a student folder with no measured order."""
    planted_teacher(tmp_path / "teacher")
    assert main(["cut", "--teacher", str(tmp_path / "teacher"), "--keep", "0,2,4,6,7",
                 "--out", str(tmp_path / "student")]) == 0
    assert read_manifest(tmp_path / "student").best is None
    return tmp_path


def test_the_order_is_measured_on_first_use_once_and_survives_an_old_manifest_and_a_move(folder, monkeypatch):
    measured = []
    real = student_module.measure_best
    monkeypatch.setattr(student_module, "measure_best", lambda *a, **k: measured.append(1) or real(*a, **k))
    opened = open_family(folder / "student")
    assert measured == [1] and opened.family.patched_for(6) == (1,)
    stored = read_manifest(folder / "student")
    assert stored.best["sizes"]["6"] == [1] and stored.patch_orders["greedy"][0] == 1
    open_family(folder / "student")
    assert measured == [1]  # kept in boomerang.json: not measured again
    shutil.copytree(folder / "student", folder / "moved")
    assert open_family(folder / "moved").family.patched_for(6) == (1,) and measured == [1]
    old = json.loads((folder / "moved" / MANIFEST).read_text())
    del old["best_sizes"]  # a folder written before the order was measured
    (folder / "moved" / MANIFEST).write_text(json.dumps(old))
    assert open_family(folder / "moved").family.patched_for(6) == (1,) and measured == [1, 1]
    assert open_family(folder / "student", order="last").family.patched_for(6) == (2,)  # an override still works


def test_every_path_builds_the_stored_best_sizes(folder, capsys):
    opened = open_family(folder / "student")  # measures and keeps the order
    best = opened.family.schedule
    assert best[6] == (1,) and best != schedule_of(PLAN, (2, 1, 0))
    # evaluation, export and serving default to it
    assert EvalRequest(str(folder / "student"), cost=True).order == "best"
    export = ExportRequest(str(folder / "student"), 6, str(folder / "six"))
    export.check()
    out = run_export(export)
    assert json.loads((out / "boomerang-size.json").read_text())["patched"] == [1]
    assert ModelCache().family(str(folder / "student"))[1].patched_for(6) == (1,)  # the chat's family
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub, {})
    assert sub.choices["serve"].parse_args(["--student", "x"]).order == "best"
    # the distilled-at-size baseline is cut to what the family's size stands for
    manifest = read_manifest(folder / "student")
    manifest.distilled = {"recipe": str(folder / "run" / "recipe.json"), "steps": 1}
    (folder / "run").mkdir()
    (folder / "run" / "recipe.json").write_text(json.dumps({"teacher": str(folder / "teacher"), "steps": 1}))
    student_module.write_manifest(folder / "student", manifest)
    (cfg,) = at_size_configs(folder / "student", [6])
    assert cfg.keep == implied_keep(PLAN, {1}) == [0, 2, 3, 4, 6, 7]
    # `boomerang family` says which candidate each size took and its calibration KL
    assert main(["family", "--student", str(folder / "student")]) == 0
    printed = capsys.readouterr().out
    assert "order    best: per size" in printed and "[greedy+reverse; KL last" in printed


def test_a_distillation_chooses_its_order_as_it_saves_the_family(tmp_path):
    from boomerang.training.loop import distill
    from boomerang.training.recipe import DistillConfig

    planted_teacher(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text("Calibration starts where the evaluated held-out blocks end. " * 400)
    phases = []
    result = distill(DistillConfig(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "corpus.txt"), steps=1,
                                   batch_size=2, seq_len=16, keep=[0, 2, 4, 6, 7], out=str(tmp_path / "run"),
                                   heldout_fraction=0.5),
                     on_phase=lambda p: phases.append(p.name))
    manifest = read_manifest(result.student_dir)
    assert manifest.best is not None and set(manifest.best["sizes"]) == {"5", "6", "7", "8"}
    assert manifest.best["tokens"] > 248  # the run's spare held-out blocks beside the built-in text
    assert "choosing the best order per size" in phases and "ranking blocks for the greedy order" in phases


def test_sizes_farther_from_the_teacher_than_a_smaller_one_are_named():
    best = BestSizes({5: (), 6: (0,), 7: (0, 1), 8: (0, 1, 2)},
                     {5: {"last": 1.0}, 6: {"first": 1.2}, 7: {"last": 0.5, "greedy": 0.4}, 8: {"last": 0.0}},
                     {5: "last", 6: "first", 7: "greedy", 8: "last"}, 100)
    assert best.dominated() == [6]
    assert BestSizes.from_dict(json.loads(json.dumps(best.to_dict()))) == best


def test_the_reverse_greedy_order_is_measured_with_the_best_one_and_builds_alone(folder):
    from boomerang.family import reverse_greedy_patch_order
    from boomerang.student import calibration_texts, read_manifest

    opened = open_family(folder / "student")  # measures the best order, both greedy rankings with it
    manifest = read_manifest(folder / "student")
    texts = calibration_texts(opened.teacher.tokenizer, folder / "student")
    assert tuple(manifest.patch_orders["reverse"]) == reverse_greedy_patch_order(
        opened.teacher.model, opened.family.student, PLAN, texts)
    assert set(manifest.best["kl"]["6"]) == {"last", "first", "greedy", "reverse"}
    alone = open_family(folder / "student", order="reverse").family
    assert alone.order == tuple(manifest.patch_orders["reverse"])
