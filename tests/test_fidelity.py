"""A family's report a user can trust: other-domain text, drop-bi ranked on a calibration split, results of
other settings never mixed into a report, every way of building the sizes (ends) measured as itself."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from boomerang import data as d
from boomerang.cli import main
from boomerang.evaluation.chart import one_measurement, points
from boomerang.evaluation.metrics import label_free
from boomerang.evaluation.results import ModelEntry, ResultStore
from boomerang.importance import block_influence, drop_order
from boomerang.models import load_teacher
from boomerang.student import calibration_ids, open_family
from tiny import save_tiny_teacher

TEXT = "Held-out text of the training domain, read by a tiny teacher one character at a time. " * 120


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A tiny teacher and a student of it whose final norm is not the teacher's (so ends show in the logits)."""
    tmp = tmp_path_factory.mktemp("fidelity")
    save_tiny_teacher(tmp / "teacher", "llama")
    assert main(["cut", "--teacher", str(tmp / "teacher"), "--out", str(tmp / "student")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp / "student")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(0.7)
    model.save_pretrained(tmp / "student")
    (tmp / "held.txt").write_text(TEXT)
    return tmp


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_report_measures_the_shipped_general_text_and_its_numbers_are_the_families(place, capsys):
    out = place / "general"
    assert main(["eval", str(place / "student"), "--general-data", "shipped", "--sizes", "5,8", "--out", str(out)]) == 0
    rows = read_csv(out / "family.csv")
    assert {r["task"] for r in rows} == {"general"}
    opened = open_family(place / "student")
    blocks = d.general_blocks(d.SHIPPED_GENERAL, opened.teacher.tokenizer, 4096)
    assert blocks.shape == (32, 128)  # the shipped excerpt holds 4,096 tokens even for a character-level tokenizer
    student = label_free(opened.family.build(5), opened.family.teacher, blocks, n_layers=5)
    measured = {r["metric"]: float(r["value"]) for r in rows if r["key"] == "student-5"}
    assert measured["perplexity"] == pytest.approx(student.perplexity, rel=1e-6)
    assert measured["kl_to_teacher"] == pytest.approx(student.kl_to_teacher, rel=1e-6)
    for metric in ("perplexity", "kl_to_teacher", "top1_agreement"):
        assert (out / "charts" / f"general-{metric}.png").stat().st_size > 1000


def test_drop_bi_ranks_layers_on_a_calibration_split_never_on_the_blocks_it_is_scored_on(place, capsys, monkeypatch):
    from boomerang.evaluation import run as eval_run

    ranked_on = []

    def recording(teacher, ids):
        ranked_on.append(ids.clone())
        return block_influence(teacher, ids)

    monkeypatch.setattr(eval_run, "block_influence", recording)
    out = place / "dropbi"
    argv = ["eval", str(place / "student"), "--heldout-data", str(place / "held.txt"), "--heldout-tokens", "256",
            "--baselines", "drop-bi", "--sizes", "5", "--out", str(out)]
    assert main(argv) == 0
    teacher = load_teacher(str(place / "teacher"))
    evaluated = d.heldout_blocks(str(place / "held.txt"), teacher.tokenizer, 256)
    spare = d.heldout_blocks(str(place / "held.txt"), teacher.tokenizer, 1024, skip_blocks=evaluated.shape[0])
    assert evaluated.shape[0] == 2 and spare.shape[0] >= 2
    # the blocks after the evaluated ones in the same held-out split: same domain, never scored
    assert len(ranked_on) == 1 and torch.equal(ranked_on[0], spare)
    split = d.heldout_blocks(str(place / "held.txt"), teacher.tokenizer, 10**6)
    assert torch.equal(split[: evaluated.shape[0] + spare.shape[0]], torch.cat([evaluated, spare]))
    dropped = drop_order(block_influence(teacher.model, spare))[:3]
    row = next(r for r in read_csv(out / "family.csv") if r["key"] == "drop-bi-5")
    assert row["blocks"] == " ".join(_runs([i for i in range(8) if i not in dropped]))
    # a held-out text with no spare blocks: the calibration text (built in, or --calibration)
    ranked_on.clear()
    (place / "small.txt").write_text(TEXT[:2900])
    assert main([*argv[:3], str(place / "small.txt"), *argv[4:-1], str(place / "dropbi-small")]) == 0
    assert ranked_on[0].shape[0] == 1 and torch.equal(ranked_on[0], calibration_ids(teacher.tokenizer, None, 1024))


def _runs(layers):
    from boomerang.family import compress_runs

    return [compress_runs([f"T{i}" for i in layers])]


def test_a_report_holds_its_own_settings_only_and_each_ends_convention_is_measured_as_itself(place, capsys, monkeypatch):
    from boomerang.evaluation import run as eval_run

    monkeypatch.setattr(eval_run, "LABEL_FREE_TOGETHER", 2)  # 3 models: passes of 2 and 1, the same numbers
    out = place / "mixed"
    # last-k: the size of 6 layers patches the top block, so the conventions give it different ends
    base = ["eval", str(place / "student"), "--heldout-data", str(place / "held.txt"), "--heldout-tokens", "256",
            "--sizes", "5,6,8", "--order", "last", "--out", str(out)]
    assert main(base) == 0
    plain = {r["key"]: float(r["value"]) for r in read_csv(out / "family.csv") if r["metric"] == "perplexity"}
    assert main([*base, "--ends", "auto"]) == 0
    assert "3 cells computed" in capsys.readouterr().out  # no cell of the other convention is taken for this one
    auto_rows = read_csv(out / "family.csv")
    auto = {r["key"]: float(r["value"]) for r in auto_rows if r["metric"] == "perplexity"}
    assert set(auto) == set(plain) == {"student-5", "interpolated-6", "teacher-8"}  # one row per model: no mix
    assert auto["interpolated-6"] != pytest.approx(plain["interpolated-6"])
    assert auto["student-5"] == pytest.approx(plain["student-5"]) and auto["teacher-8"] == pytest.approx(plain["teacher-8"])
    opened = open_family(place / "student", ends="auto", order="last")
    held = d.heldout_blocks(str(place / "held.txt"), opened.teacher.tokenizer, 256)
    direct = label_free(opened.family.build(6), opened.family.teacher, held, n_layers=6)
    assert auto["interpolated-6"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert "norm and head: teacher" in next(r["blocks"] for r in auto_rows if r["key"] == "interpolated-6")
    assert main(base) == 0  # the first convention again: all on disk, and its report is its own again
    assert "0 cells computed, 3 already on disk" in capsys.readouterr().out
    again = {r["key"]: float(r["value"]) for r in read_csv(out / "family.csv") if r["metric"] == "perplexity"}
    assert again == plain
    assert len(list((out / "cells" / "interpolated-6").glob("heldout.*.json"))) == 2  # both kept, keyed apart


def test_a_cached_cell_is_reused_only_for_the_same_model(tmp_path):
    store = ResultStore(tmp_path)
    entry = ModelEntry("drop-bi-5", "drop-bi", 5, 100, 80, "T0-4")
    store.put(entry, "quiz", "abc", {"task": "quiz", "metrics": {"acc": (0.5, 0.1)}})
    assert store.get("drop-bi-5", "quiz", "abc", model=entry)["metrics"]["acc"] == [0.5, 0.1]
    assert store.get("drop-bi-5", "quiz", "abc", model=ModelEntry("drop-bi-5", "drop-bi", 5, 100, 80, "T0-3 T5")) is None


def test_a_chart_shows_each_task_measured_one_way():
    def row(key, cell, value, task="quiz"):
        return {"key": key, "series": "interpolated", "n_layers": 1, "params": 1, "task": task, "metric": "acc",
                "value": value, "cell": cell}

    rows = [row("a", "quiz.old.json", 0.1), row("b", "quiz.old.json", 0.2), row("c", "quiz.old.json", 0.3),
            row("a", "quiz.new.json", 0.5), row("b", "quiz.new.json", 0.6), row("a", "t2.x.json", 0.9, "t2"),
            row("b", "t2.x.json", 0.7, "t2"), row("c", "t2.x.json", 0.5, "t2")]
    kept, hidden = one_measurement(rows, "quiz", "acc")
    assert {(r["key"], r["value"]) for r in kept} == {("a", 0.1), ("b", 0.2), ("c", 0.3)} and hidden == 2
    tie = rows[:2] + rows[3:5]  # two settings covering the same models: the one measured last
    assert {r["value"] for r in one_measurement(tie, "quiz", "acc")[0]} == {0.5, 0.6}
    avg = {p["key"]: p["value"] for p in points(rows, "average", "acc")}
    assert avg == {"a": pytest.approx(0.5), "b": pytest.approx(0.45), "c": pytest.approx(0.4)}
    assert json.dumps(kept)  # plain rows


def test_any_checkpoint_opens_as_a_family_and_the_last_one_is_the_student(tmp_path, capsys):
    from boomerang.training.checkpoint import snapshot
    from boomerang.training.loop import distill
    from boomerang.training.recipe import DistillConfig

    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = DistillConfig(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "corpus.txt"), out=str(tmp_path / "run"),
                        steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup=0.25, checkpoint_every=100)
    stops = iter([False, True])
    assert distill(cfg, should_stop=lambda: next(stops)).stopped  # stopped at step 2: a checkpoint, no student
    run = tmp_path / "run"
    assert main(["snapshot", str(run)]) == 0
    half = run / "snapshots" / "step-2"
    assert f"wrote the checkpoint as a student folder: {half}" in capsys.readouterr().out
    manifest = json.loads((half / "boomerang.json").read_text())
    assert manifest["distilled"]["steps"] == 2 and manifest["distilled"]["of_steps"] == 4
    assert manifest["distilled"]["checkpoint"] is True
    assert torch.equal(torch.load(half / d.HELDOUT_FILE), torch.load(run / d.HELDOUT_FILE))  # its held-out split
    weights = torch.load(run / "checkpoint.pt", weights_only=True)["student"]
    opened = open_family(half)
    for name, value in opened.family.student.state_dict().items():
        assert torch.equal(value, weights[name]), name
    # commands take the run folder itself: the snapshot of its last checkpoint
    assert main(["eval", str(run), "--general-data", "shipped", "--heldout-tokens", "256", "--sizes", "5"]) == 0
    assert "the run's last checkpoint, as a student folder" in capsys.readouterr().err
    assert (half / "eval" / "family.csv").is_file()
    distill(cfg, resume=True)
    final = snapshot(run)  # the last checkpoint is the final student, exactly
    assert final == run / "snapshots" / "step-4"
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(open_family(final).family.student(x).logits, open_family(run / "student").family.student(x).logits)
    with pytest.raises(Exception, match="is not a distillation's run folder"):
        snapshot(tmp_path / "teacher")


def test_a_student_distilled_at_a_size_with_the_familys_recipe_joins_its_evaluation(tmp_path, capsys):
    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text(TEXT)
    base = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "corpus.txt"), "--seq-len", "16",
            "--batch-size", "2", "--device", "cpu", "--steps", "3", "--lr", "0.002"]
    assert main(["distill", *base, "--recipe", "paper", "--mix-prob", "0.5", "--out", str(tmp_path / "run")]) == 0
    student = tmp_path / "run" / "student"
    assert main(["baselines", str(student), "--sizes", "6"]) == 0
    at = tmp_path / "run" / "at-size" / "6"
    family_recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    recipe = json.loads((at / "recipe.json").read_text())
    # the size's own teacher layers (last-k, 6 layers: S0 S1 T4 T5 S3 S4 of the plan 0,2,4,6,7), every step on it
    assert recipe["keep"] == [0, 2, 4, 5, 6, 7] and recipe["mix_prob"] == 0.0
    same = {k: v for k, v in family_recipe.items() if k not in ("keep", "mix_prob", "out", "evaluate", "plan")}
    assert {k: recipe[k] for k in same} == same  # recipe, data, steps, batch, seed: the family's own
    assert len(json.loads((at / "metrics.jsonl").read_text().splitlines()[-1])) and (at / "student" / "boomerang.json").is_file()
    assert main(["baselines", str(student), "--sizes", "6"]) == 0
    assert "already distilled" in capsys.readouterr().out
    assert main(["eval", str(student), "--general-data", "shipped", "--heldout-tokens", "256"]) == 0
    rows = read_csv(student / "eval" / "family.csv")
    mine = [r for r in rows if r["series"] == "distilled"]
    assert {r["key"] for r in mine} == {"distilled-6"} and mine[0]["n_layers"] == "6"
    interpolated = next(r for r in rows if r["key"] == "interpolated-6" and r["metric"] == "perplexity")
    assert mine[0]["params"] == interpolated["params"]  # the same size, two ways to get it
    opened = open_family(at / "student")
    blocks = d.general_blocks(d.SHIPPED_GENERAL, opened.teacher.tokenizer, 256)
    direct = label_free(opened.family.student, opened.teacher.model, blocks, n_layers=6).perplexity
    assert float(next(r["value"] for r in mine if r["metric"] == "perplexity")) == pytest.approx(direct, rel=1e-6)
    capsys.readouterr()
    assert main(["baselines", str(student), "--sizes", "8"]) == 2
    assert "no size with 8 layers between this family's student and teacher: its sizes are 6, 7" in capsys.readouterr().err


def test_students_that_split_the_familys_budget_are_compared_with_it_at_equal_total_budget(tmp_path, capsys):
    """`baselines --split`: K students with 1/K of the family's steps each, evaluated as the `split` series; every
    model carries its training tokens (a family's sizes its one run's); compare sets each size beside the split
    student at equal total budget, and charts quality against total tokens."""
    from boomerang.evaluation.budget import training_costs

    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text(TEXT)
    base = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "corpus.txt"), "--seq-len", "16",
            "--batch-size", "2", "--device", "cpu", "--steps", "6", "--lr", "0.002"]
    assert main(["distill", *base, "--recipe", "paper", "--mix-prob", "0.5", "--out", str(tmp_path / "run")]) == 0
    student = tmp_path / "run" / "student"
    assert main(["baselines", str(student), "--split"]) == 0  # the family's sizes 6 and 7: 3 steps each
    assert "3 steps" in capsys.readouterr().out
    for n in (6, 7):
        recipe = json.loads((tmp_path / "run" / "at-size" / "split2" / str(n) / "recipe.json").read_text())
        assert recipe["steps"] == 3 and recipe["mix_prob"] == 0.0
    costs = training_costs(student)
    assert costs["family"]["train_tokens"] == 6 * 2 * 16 and costs["family"]["train_seconds"] > 0
    assert costs["split2-6"]["train_tokens"] == costs["split2-7"]["train_tokens"] == 3 * 2 * 16
    assert main(["eval", str(student), "--general-data", "shipped", "--heldout-tokens", "256", "--baselines",
                 "undistilled"]) == 0
    rows = read_csv(student / "eval" / "family.csv")
    assert {r["key"] for r in rows if r["series"] == "split"} == {"split2-6", "split2-7"}
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(student), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = read_csv(out / "families.csv")
    tokens = {r["key"].split(":")[-1]: r["train_tokens"] for r in table}
    assert tokens["interpolated-6"] == tokens["student-5"] == "192" and tokens["split2-6"] == "96"
    assert tokens["teacher-8"] == "" and tokens["undistilled-6"] == "0"
    pairs = read_csv(out / "equal-budget.csv")
    kl = [p for p in pairs if p["task"] == "general" and p["metric"] == "kl_to_teacher"]
    assert [p["n_layers"] for p in kl] == ["6", "7"]
    assert {(p["family_tokens"], p["split_tokens"]) for p in kl} == {("192", "192")}  # equal total budget
    family_kl = {int(r["n_layers"]): float(r["value"]) for r in rows
                 if r["series"] == "interpolated" and r["task"] == "general" and r["metric"] == "kl_to_teacher"}
    assert float(kl[0]["interpolated"]) == pytest.approx(family_kl[6])
    assert "general equal-budget run at 6 layers: kl_to_teacher family" in printed
    assert "(family 192 tokens for every size; split students 192 together)" in printed
    assert "at equal total budget, of 2 sizes the family's is better at" in printed
    # the recipe each model's family was made with, hashed, beside every number
    from boomerang.evaluation.provenance import file_hash

    recipe = {r["key"].split(":")[-1]: r["recipe_hash"] for r in table}
    assert recipe["interpolated-6"] == file_hash([tmp_path / "run" / "recipe.json"]) != ""
    chart_html = out / "charts" / "budget-general-kl_to_teacher.html"
    assert chart_html.is_file() and "total training tokens" in chart_html.read_text()
    # the charts on another axis, from the table written above
    assert main(["compare", str(out / "families.csv"), "--out", str(tmp_path / "cmp2"), "--x-axis",
                 "parameters without embeddings"]) == 0
    assert "general kl_to_teacher vs. parameters without embeddings" in (
        tmp_path / "cmp2" / "charts" / "general-kl_to_teacher.html").read_text().replace(":", "")


def test_several_families_share_one_chart_and_one_pareto_frontier(place, tmp_path, capsys):
    from boomerang.evaluation.chart import pareto

    other = tmp_path / "other" / "student"  # a second family of the same teacher: the undistilled one
    other.parent.mkdir()
    assert main(["cut", "--teacher", str(place / "teacher"), "--out", str(other)]) == 0
    (tmp_path / "held2.txt").write_text(TEXT.replace("tiny", "small") * 2)
    for student, held in ((place / "student", place / "held.txt"), (other, tmp_path / "held2.txt")):
        assert main(["eval", str(student), "--general-data", "shipped", "--heldout-data", str(held),
                     "--heldout-tokens", "256", "--out", str(student / "eval")]) == 0
    capsys.readouterr()
    out = tmp_path / "both"
    assert main(["compare", str(place / "student"), str(other), "--name", "mine", "--name", "cut", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(out / "families.csv")
    general = [r for r in rows if r["task"] == "general" and r["metric"] == "perplexity"]
    assert {r["family"] for r in general} == {"mine", "cut", ""}
    assert [r["key"] for r in general if r["series"] == "teacher"] == ["teacher-8"]  # the teacher once
    assert {r["key"] for r in general if r["family"] == "cut"} == {"cut:student-5", "cut:interpolated-6", "cut:interpolated-7"}
    pts = [{"key": r["key"], "params": int(r["params"]), "value": float(r["value"])} for r in general]
    front = [p["key"] for p in pareto(pts, higher_is_better=False)]
    assert f"general perplexity: Pareto frontier {', '.join(front)}" in printed
    assert {r["key"] for r in general if r["pareto"] == "frontier"} == set(front)
    assert all(r["pareto"].startswith("dominated by ") for r in general if r["key"] not in front)
    # the two families were measured on different held-out texts: their heldout numbers never share a chart
    charted = {r["family"] for r in rows if r["task"] == "heldout" and r["pareto"]}
    assert charted in ({"mine", ""}, {"cut", ""})
    assert (out / "charts" / "general-perplexity.png").stat().st_size > 1000
    assert main(["compare", str(place / "student"), str(place / "student"), "--out", str(out)]) == 2
    assert "two families have the same name" in capsys.readouterr().err
    # a published table stands in for a family whose folder a user does not have: the same chart, the same frontier
    again = tmp_path / "again"
    assert main(["compare", str(place / "student"), f"{out / 'families.csv'}:cut", "--name", "mine",
                 "--out", str(again)]) == 0
    assert capsys.readouterr().out.split("table ")[0] == printed.split("table ")[0]
    key = lambda r: (r["key"], r["task"], r["metric"])  # noqa: E731
    assert sorted(map(key, read_csv(again / "families.csv"))) == sorted(map(key, rows))
    assert {key(r): (float(r["value"]), r["pareto"]) for r in read_csv(again / "families.csv")} == \
        {key(r): (float(r["value"]), r["pareto"]) for r in rows}
    assert main(["compare", str(place / "student"), str(out / "families.csv"), "--name", "mine", "--out", str(again)]) == 2
    assert "two families have the same name (mine)" in capsys.readouterr().err
    assert main(["compare", f"{out / 'families.csv'}:nope", "--out", str(again)]) == 2
    assert "has no family nope: it has mine, cut" in capsys.readouterr().err


def test_a_baseline_measured_again_in_another_family_is_drawn_once():
    from boomerang.evaluation.chart import combine, points

    def row(key, series, value, cell="general.abc.json", n=6):
        return {"key": key, "series": series, "n_layers": n, "params": n * 10, "task": "general", "metric": "perplexity",
                "value": value, "stderr": None, "cell": cell}

    run = [row("teacher-8", "teacher", 10.0, n=8), row("interpolated-6", "interpolated", 30.0),
           row("drop-bi-6", "drop-bi", 50.0), row("distilled-6", "distilled", 20.0)]
    # an ends variant of the run: its own interpolated size, the same drop-bi and distilled student measured again
    cell = "general.abc@e1.json"
    variant = [row("teacher-8", "teacher", 10.0, cell, n=8), row("interpolated-6", "interpolated", 28.0, cell),
               row("drop-bi-6", "drop-bi", 50.0, cell), row("distilled-6", "distilled", 20.0, cell)]
    other = [row("drop-bi-6", "drop-bi", 51.0), row("distilled-6", "distilled", 25.0)]  # another corpus: other models
    keys = [p["key"] for p in points(combine({"run": run, "ends": variant, "other": other}), "general", "perplexity")]
    assert sorted(k for k in keys if "interpolated" in k) == ["ends:interpolated-6", "run:interpolated-6"]
    assert sorted(k for k in keys if "drop-bi" in k or "distilled" in k) == [
        "other:distilled-6", "other:drop-bi-6", "run:distilled-6", "run:drop-bi-6"]


def test_a_plan_is_pinned_from_an_earlier_run_or_student(place, tmp_path, capsys):
    from boomerang.cli import build_parser, distill_config_from_args

    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({"n_teacher": 8, "kept": [0, 1, 3, 5, 6, 7]}))
    assert main(["cut", "--teacher", str(place / "teacher"), "--keep", "0,2,3,5,7", "--out", str(tmp_path / "st")]) == 0

    def cfg(*flags):
        args = build_parser().parse_args(["distill", "--teacher", str(place / "teacher"), "--data", "x.txt", *flags])
        return distill_config_from_args(args)

    assert cfg("--keep-from", str(run)).keep == [0, 1, 3, 5, 6, 7]
    assert cfg("--recipe", "cpu", "--keep-from", str(tmp_path / "st")).keep == [0, 2, 3, 5, 7]
    pinned = cfg("--recipe", "cpu", "--keep-from", str(run))
    assert pinned.plan == "importance" and pinned.plan_for(8).kept == (0, 1, 3, 5, 6, 7)  # kept layers win over a measure
    with pytest.raises(Exception, match="give --keep or --keep-from, not both"):
        cfg("--keep", "0,7", "--keep-from", str(run))
    with pytest.raises(Exception, match="is not a student folder"):
        cfg("--keep-from", str(tmp_path))


def test_default_distilled_at_size_sizes_spread_over_the_family():
    from boomerang.training.at_size import default_sizes

    assert default_sizes(list(range(16, 31))) == [20, 23, 26]
    assert default_sizes([5, 6, 7, 8]) == [6, 7] and default_sizes([5, 8]) == []


def test_label_free_metrics_of_many_models_at_once_are_each_models_own():
    from boomerang.evaluation.metrics import label_free_many
    from boomerang.family import Family
    from boomerang.plan import LayerPlan
    from boomerang.student import cut_student
    from tiny import tiny_model, tokens

    teacher = tiny_model("qwen2")
    plan = LayerPlan.from_rule(8)
    student = cut_student(teacher, plan)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.9)
    fam = Family(teacher, student, plan)
    models = {n: fam.build(n) for n in fam.layer_counts}
    blocks = tokens(5, 16)
    together = label_free_many(models, teacher, blocks, batch_size=2, n_layers={n: n for n in models})
    for n, model in models.items():
        assert together[n] == label_free(model, teacher, blocks, batch_size=2, n_layers=n)
    assert together[8].kl_to_teacher == 0 and together[8].top1_agreement == 1


def test_variants_of_a_family_share_a_chart_when_measured_alike_and_never_mix_within_a_family():
    def row(family, key, cell, value):
        return {"family": family, "key": f"{family}:{key}", "series": "interpolated", "n_layers": 1, "params": 1,
                "task": "general", "metric": "perplexity", "value": value, "cell": cell}

    rows = [row("plain", "i-6", "general.m1.json", 10.0), row("plain", "i-7", "general.m1.json", 9.0),
            row("auto", "i-6", "general.m1@ab12.json", 8.0), row("auto", "i-7", "general.m1@ab12.json", 7.5),
            row("plain", "i-6", "general.m1@cd34.json", 11.0),  # one size of another variant in the same folder
            row("other", "i-6", "general.m2.json", 1.0)]  # another text: never on this chart
    kept, hidden = one_measurement(rows, "general", "perplexity")
    assert sorted((r["key"], r["value"]) for r in kept) == [("auto:i-6", 8.0), ("auto:i-7", 7.5),
                                                           ("plain:i-6", 10.0), ("plain:i-7", 9.0)]
    assert hidden == 2


def test_each_interpolated_size_is_set_beside_the_student_distilled_at_that_size(tmp_path, capsys):
    """The paper's central comparison, size by size, from a table: pairs in a family and with NAME-at-size, never
    across families; the verdict needs two standard errors of the difference."""
    from boomerang.evaluation.compare import GAP_FIELDS, TABLE_FIELDS

    def row(family, series, n, value, stderr):
        return {"family": family, "key": f"{family}:{series}-{n}" if family else f"{series}-{n}", "series": series,
                "n_layers": n, "params": n * 1000, "task": "general", "metric": "kl_to_teacher", "value": value,
                "stderr": stderr, "pareto": "", "cell": "general.m1.json"}

    rows = [row("", "teacher", 8, 0.0, 0.0),
            row("run", "interpolated", 6, 0.50, 0.03), row("run", "interpolated", 7, 0.30, 0.03),
            row("run", "distilled", 6, 0.39, 0.04),            # 0.11 apart, stderr 0.05: beyond 2 of them
            row("run-at-size", "distilled", 7, 0.25, 0.04),    # 0.05 apart: within noise
            row("other", "interpolated", 6, 0.60, None), row("other", "distilled", 7, 0.10, None)]  # no 6 of its own
    table = tmp_path / "families.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "cmp"
    assert main(["compare", str(table), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    gaps = read_csv(out / "at-size.csv")
    assert list(gaps[0]) == GAP_FIELDS
    assert [(g["family"], g["n_layers"], g["winner"]) for g in gaps] == [
        ("run", "6", "distilled"), ("run", "7", "within noise")]
    assert float(gaps[0]["difference"]) == pytest.approx(0.11) and float(gaps[0]["stderr"]) == pytest.approx(0.05)
    assert float(gaps[0]["relative"]) == pytest.approx(0.11 / 0.39)
    assert ("general at-size run at 6 layers: kl_to_teacher interpolated 0.5, distilled at the size 0.39 (+28%, 2.2 "
            "standard errors): the student distilled at the size is better") in printed
    assert "run at 7 layers: kl_to_teacher interpolated 0.3, distilled at the size 0.25 (+20%, 1.0 standard errors): " \
           "within noise of each other" in printed
    assert ("general kl_to_teacher: of 2 sizes with a student distilled at the size, the distilled student is better "
            "at 1, the interpolated size at 0, 1 within noise") in printed
    # a comparison with no pair leaves no at-size.csv of an earlier one in its folder
    assert main(["compare", f"{table}:other", "--out", str(out)]) == 0
    assert "at-size" not in capsys.readouterr().out and not (out / "at-size.csv").exists()


def test_a_better_interpolated_size_and_a_gap_without_standard_errors_are_called_by_their_sign():
    from boomerang.evaluation.chart import at_size_gaps

    def pt(series, n, value, stderr=None):
        return {"key": f"{series}-{n}", "series": series, "n_layers": n, "params": n, "value": value, "stderr": stderr}

    top1 = [pt("interpolated", 6, 0.70, 0.01), pt("distilled", 6, 0.60, 0.01), pt("interpolated", 7, 0.8),
            pt("distilled", 7, 0.9), pt("student", 5, 0.5), pt("distilled", 5, 0.55)]
    gaps = at_size_gaps(top1, "top1_agreement")  # higher is better; the student is no interpolated size
    assert [(g["n_layers"], g["winner"], g["stderr"]) for g in gaps] == [(6, "interpolated", pytest.approx(0.01 * 2 ** 0.5)),
                                                                         (7, "distilled", None)]
    assert at_size_gaps([pt("interpolated", 6, 1.0), pt("distilled", 6, 1.0)], "perplexity")[0]["winner"] == "within noise"


def test_a_familys_own_student_distilled_at_the_size_is_paired_before_one_of_its_at_size_family():
    from boomerang.evaluation.chart import AT_SIZE_SUFFIX, at_size_gaps

    def pt(family, series, value):
        return {"family": family, "key": f"{family}:{series}-6", "series": series, "n_layers": 6, "params": 6,
                "value": value, "stderr": 0.01}

    own, other = pt("run", "distilled", 0.40), pt("run" + AT_SIZE_SUFFIX, "distilled", 0.20)
    interp = pt("run", "interpolated", 0.50)
    for order in ([interp, own, other], [interp, other, own]):  # whichever family the table lists first
        assert [g["distilled"] for g in at_size_gaps(order, "kl_to_teacher")] == [0.40]
    assert [g["distilled"] for g in at_size_gaps([interp, other], "kl_to_teacher")] == [0.20]


def test_a_later_batch_of_students_distilled_at_sizes_named_name_at_size_tag_pairs_with_name():
    """A table already holding NAME-at-size refuses a folder of that name, so a second batch is NAME-at-size-TAG;
    names that only contain the suffix inside a word, or are nothing but it, pair with no family."""
    from boomerang.evaluation.chart import at_size_gaps, at_size_of

    assert [at_size_of(n) for n in ("paper-4x-at-size", "paper-4x-at-size-23", "paper-4x", "run-at-sizes",
                                    "-at-size", "a-at-size-b-at-size")] == [
        "paper-4x", "paper-4x", None, None, None, "a-at-size-b"]

    def pt(family, series, n, value):
        return {"family": family, "key": f"{family}:{series}-{n}", "series": series, "n_layers": n, "params": n,
                "value": value, "stderr": 0.01}

    pts = [pt("run", "interpolated", 6, 0.50), pt("run", "interpolated", 7, 0.30),
           pt("run-at-size", "distilled", 6, 0.40), pt("run-at-size-7", "distilled", 7, 0.20),
           pt("run-at-sizes", "distilled", 6, 0.10)]  # not an at-size family: never paired
    assert [(g["n_layers"], g["distilled"]) for g in at_size_gaps(pts, "kl_to_teacher")] == [(6, 0.40), (7, 0.20)]
