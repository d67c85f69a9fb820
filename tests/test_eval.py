"""Evaluation: lm-eval offline on local files, a rigged model scores 1.0, results and charts, resume."""

import csv
import hashlib
import json

import pytest
import torch
from torch.testing import assert_close

from boomerang.cli import main
from boomerang.errors import BoomerangError
from boomerang.evaluation import task_files as tasks
from boomerang.evaluation.chart import pareto, points
from boomerang.evaluation.metrics import EvalSettings, lm_eval_task, metrics_of
from boomerang.family import Family
from boomerang.importance import block_influence, drop_order, dropped_teacher
from boomerang.plan import LayerPlan
from boomerang.student import cut_student
from tiny import N_LAYERS, save_tiny_teacher, tiny_model, tiny_tokenizer, tokens

ANSWER = "xyz"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_eval_files(folder):
    """A few items in each format; the gold answer is always "xyz", the distractors never are."""
    folder.mkdir(exist_ok=True)
    mc = [{"query": f"Question: item {i}?", "choices": ["xzy", "yxz", ANSWER][-(i % 3):] + ["xzy", "yxz", ANSWER][:-(i % 3) or 3],
           "gold": None} for i in range(5)]
    for row in mc:
        row["choices"] = row["choices"][:3]
        row["gold"] = row["choices"].index(ANSWER)
    (folder / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    part = [{"context_options": ["ab", "ac"] if i % 2 else ["ac", "ab"], "continuation": ANSWER, "gold": 0 if i % 2 else 1}
            for i in range(4)]
    (folder / "fill.part1of2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part[:2]))
    (folder / "fill.part2of2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part[2:]))
    cloze = [{"context": f"story {i} ab", "continuation": ANSWER} for i in range(3)]
    (folder / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cloze))
    (folder / "notes.jsonl").write_text(json.dumps({"something": "else"}) + "\n")
    return folder


GOLD_CHAIN = [("?", " "), ("b", " "), (" ", "x"), ("x", "y"), ("y", "z")]
WRONG_CHAIN = [("?", " "), ("b", " "), (" ", "x"), ("x", "z"), ("z", "y")]  # spells the distractor "xzy"


def rigged_model(chain=GOLD_CHAIN):
    """A tiny model whose next character is fixed by the previous one, as in the gold answers:
    "?"/"b" -> " ", " " -> "x", "x" -> "y", "y" -> "z". Every gold answer is then near-certain."""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    table = {}
    for prev, nxt in chain:
        table[tok.convert_tokens_to_ids(prev)] = tok.convert_tokens_to_ids(nxt)
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(ids=kwargs.get("input_ids", args[0] if args else None),
                                                                        keep=kwargs.get("logits_to_keep")),
                                    with_kwargs=True)

    def rig(module, args, output):
        bias = torch.zeros_like(output)
        ids = seen["ids"] if not isinstance(seen["keep"], torch.Tensor) else seen["ids"][:, seen["keep"]]  # (B, P)
        for prev, nxt in table.items():
            bias[..., nxt] += 60.0 * (ids == prev).to(output.dtype)
        return output * 0 + bias

    model.lm_head.register_forward_hook(rig)
    return model, tok


def test_local_task_discovery(tmp_path):
    found = tasks.discover(write_eval_files(tmp_path / "data"))
    assert {n: t.format for n, t in found.items()} == {"quiz": "multiple_choice", "fill": "partial", "cloze": "cloze"}
    assert len(found["fill"].files) == 2
    with pytest.raises(BoomerangError, match="evaluation data folder not found"):
        tasks.discover(tmp_path / "missing")
    with pytest.raises(BoomerangError, match="no task .arc_easy. in .*found: arc_easy_mini, cloze, fill, hellaswag_mini, piqa_mini, quiz"):
        tasks.resolve(["arc_easy"], tmp_path / "data")


@pytest.mark.parametrize("task, metrics", [("quiz", {"acc": 1.0, "acc_norm": 1.0}), ("fill", {"acc": 1.0}),
                                           ("cloze", {"acc": 1.0})])
def test_a_rigged_model_scores_one_offline(tmp_path, task, metrics):
    model, tok = rigged_model()
    spec = tasks.resolve([task], write_eval_files(tmp_path / "data"))[0]
    result = lm_eval_task(model, tok, spec, EvalSettings(batch_size=4))
    got = metrics_of(result)
    for metric, value in metrics.items():
        assert got[metric][0] == pytest.approx(value), (task, metric, got)
        # lm-eval leaves stderr "N/A" (bootstrap_iters=0); a mean of hits gets its binomial one: 0 at p = 1
        assert got[metric][1] == (0.0 if metric in ("acc", "acc_norm") else None)
    assert result["n-samples"]["effective"] > 0 and result["lm_eval_version"]
    if task == "cloze":
        assert got["perplexity"][0] == pytest.approx(1.0, abs=1e-3)


def test_a_model_rigged_for_a_distractor_scores_zero(tmp_path):
    model, tok = rigged_model(WRONG_CHAIN)
    spec = tasks.resolve(["quiz"], write_eval_files(tmp_path / "data"))[0]
    assert metrics_of(lm_eval_task(model, tok, spec, EvalSettings()))["acc"][0] == 0.0


def test_what_a_model_gets_right_that_another_does_not_item_by_item_on_a_planted_task(tmp_path):
    """Golds planted so the model rigged for "xyz" is right on items 0-2, the one rigged for "xzy" on 3-4, and
    neither on 5 (gold "yxz"): the two-model counts equal that hand count, McNemar's test says within noise."""
    from boomerang.evaluation import items

    golds = ["xyz", "xyz", "xyz", "xzy", "xzy", "yxz"]
    rows = [{"query": f"Question: item {i}?", "choices": ["xyz", "xzy", "yxz"], "gold": ["xyz", "xzy", "yxz"].index(g)}
            for i, g in enumerate(golds)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tasks.resolve(["planted"], tmp_path / "data")[0]
    scored = {}
    for name, chain in (("gold", GOLD_CHAIN), ("wrong", WRONG_CHAIN)):
        model, tok = rigged_model(chain)
        scored[name] = lm_eval_task(model, tok, spec, EvalSettings(batch_size=4))["items"]
    result = items.pair(scored["gold"], scored["wrong"])
    assert {k: result[k] for k in ("both", "only_a", "only_b", "neither", "n")} == {
        "both": 0, "only_a": 3, "only_b": 2, "neither": 1, "n": 6}
    assert [r["right"] for r in result["rows"]] == ["only_a"] * 3 + ["only_b"] * 2 + ["neither"]
    assert [r["pick_a"] for r in result["rows"]] == [0] * 6 and [r["pick_b"] for r in result["rows"]] == [1] * 6
    assert result["p_value"] == 1.0 and result["acc_a"] == pytest.approx(0.5)
    assert "both right 0, only gold 3, only wrong 2, neither 1" in items.summary(result, "gold", "wrong")
    assert items.pair(scored["gold"], scored["wrong"], "acc_norm")["only_a"] == 3
    # McNemar's exact test against the binomial tail by hand
    assert items.mcnemar(0, 0) == 1.0 and items.mcnemar(5, 0) == pytest.approx(2 / 32)
    assert items.mcnemar(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096) and items.mcnemar(2, 10) == items.mcnemar(10, 2)
    with pytest.raises(BoomerangError, match="different documents"):
        items.pair(scored["gold"], [{**i, "doc": "other"} for i in scored["wrong"]])
    with pytest.raises(BoomerangError, match="share no scored item"):
        items.pair(scored["gold"], [])


def test_undistilled_sizes_are_layer_dropping_by_the_plan():
    teacher = tiny_model("llama")
    plan = LayerPlan.from_rule(N_LAYERS)
    fam = Family(teacher, cut_student(teacher, plan, share=True), plan)
    x = tokens()
    for n in fam.layer_counts[:-1]:
        ran = [int(name[1:]) for name in fam.info(n).layers]  # student layer j is teacher layer kept[j]
        teacher_layers = [plan.kept[i] if name[0] == "S" else i for name, i in zip(fam.info(n).layers, ran, strict=False)]
        dropped = [i for i in range(N_LAYERS) if i not in teacher_layers]
        assert_close(fam.build(n)(x).logits, dropped_teacher(teacher, dropped)(x).logits, rtol=0, atol=0)


def test_block_influence_drops_an_identity_layer_first():
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.layers[5].self_attn.o_proj.weight.zero_()
        teacher.model.layers[5].mlp.down_proj.weight.zero_()
    bi = block_influence(teacher, tokens(2, 16))
    assert bi[5] == pytest.approx(0, abs=1e-6) and min(bi[:5] + bi[6:]) > 1e-4
    assert drop_order(bi)[0] == 5


def test_pareto_and_average():
    pts = [{"key": k, "params": p, "value": v, "series": "interpolated", "n_layers": 1}
           for k, p, v in [("a", 1, 0.5), ("b", 2, 0.4), ("c", 3, 0.7), ("d", 3, 0.6)]]
    assert [p["key"] for p in pareto(pts)] == ["a", "c"]
    assert [p["key"] for p in pareto(pts, higher_is_better=False)] == ["a", "b"]
    rows = [{"key": "m", "series": "teacher", "n_layers": 2, "params": 5, "task": t, "metric": "acc", "value": v}
            for t, v in [("t1", 0.2), ("t2", 0.4)]] + [
           {"key": "n", "series": "student", "n_layers": 1, "params": 3, "task": "t1", "metric": "acc", "value": 0.9}]
    avg = points(rows, "average", "acc")
    assert [(p["key"], p["value"]) for p in avg] == [("m", pytest.approx(0.3))]  # n lacks t2: left out


def test_eval_command_end_to_end_and_resume(tmp_path, capsys):
    save_tiny_teacher(tmp_path / "teacher", "llama")
    main(["cut", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")])
    data = write_eval_files(tmp_path / "data")
    (tmp_path / "held.txt").write_text("Held-out text for label-free metrics. " * 80)
    argv = ["eval", str(tmp_path / "student"), "--tasks", "quiz,fill,cloze", "--data-dir", str(data),
            "--baselines", "undistilled,drop-bi", "--heldout-data", str(tmp_path / "held.txt"), "--cost",
            "--sizes", "5,7,8", "--out", str(tmp_path / "results")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # 3 sizes + 2 undistilled + 2 drop-bi = 7 models, 5 cells each
    assert "35 cells computed, 0 already on disk" in out
    with open(tmp_path / "results" / "family.csv") as f:
        rows = list(csv.DictReader(f))
    # what is there so far, printed as each cell lands: a line per cell, the table's own numbers
    partial = [line for line in out.splitlines() if line.startswith("partial: ")]
    assert len(partial) == 35 and len({line.split(":")[1] for line in partial}) == 35
    acc = next(r for r in rows if r["key"] == "student-5" and r["task"] == "quiz" and r["metric"] == "acc")
    assert f"partial: student-5 quiz: acc {float(acc['value']):.4g}" in partial  # all 5 right: no spread
    assert any(line.startswith("partial: student-5 heldout: kl_to_teacher ") and " ± " in line and ", perplexity "
               in line for line in partial), partial
    keys = {r["key"] for r in rows}
    assert keys == {"student-5", "interpolated-7", "teacher-8", "undistilled-5", "undistilled-7", "drop-bi-5", "drop-bi-7"}
    assert {r["task"] for r in rows} == {"quiz", "fill", "cloze", "heldout", "cost"}
    teacher_kl = [r for r in rows if r["key"] == "teacher-8" and r["metric"] == "kl_to_teacher"][0]
    assert float(teacher_kl["value"]) == pytest.approx(0, abs=1e-6)
    charts = tmp_path / "results" / "charts"
    for name in ("quiz-acc", "average-acc", "heldout-perplexity", "heldout-kl_to_teacher", "heldout-top1_agreement"):
        assert (charts / f"{name}.html").stat().st_size > 1000 and (charts / f"{name}.png").stat().st_size > 1000
    cell = json.loads(next((tmp_path / "results" / "cells" / "teacher-8").glob("quiz.*.json")).read_text())
    assert cell["settings"] == {"num_fewshot": 0, "limit": None, "batch_size": 8, "seed": 0} and cell["versions"] == 1
    cells = tmp_path / "results" / "cells"
    reused = json.loads(next((cells / "undistilled-5").glob("cost.*.json")).read_text())
    measured = json.loads(next((cells / "student-5").glob("cost.*.json")).read_text())
    assert reused["same_shape_as"] == "student-5" and reused["metrics"] == measured["metrics"]  # same shape, same cost
    assert "same_shape_as" not in json.loads(next((cells / "teacher-8").glob("cost.*.json")).read_text())
    assert main(argv) == 0
    assert "0 cells computed, 35 already on disk" in capsys.readouterr().out
    # how every number was made, in the table
    table = read_csv(tmp_path / "results" / "family.csv")
    quiz_row = next(r for r in table if r["key"] == "student-5" and r["task"] == "quiz" and r["metric"] == "acc")
    assert (quiz_row["device"], quiz_row["dtype"], quiz_row["items"], quiz_row["fewshot"], quiz_row["seed"]) == (
        "cpu", "float32", "5", "0", "0")
    assert quiz_row["task_hash"] == hashlib.sha256((data / "quiz.jsonl").read_bytes()).hexdigest()[:12]
    assert quiz_row["lm_eval"] and quiz_row["transformers"] and quiz_row["torch"] == torch.__version__
    held_row = next(r for r in table if r["key"] == "teacher-8" and r["task"] == "heldout" and r["metric"] == "kl_to_teacher")
    assert int(held_row["items"]) > 0 and held_row["fewshot"] == "" and held_row["task_hash"] == ""
    # every scored item is kept; two models compared item by item from the command line
    quiz = json.loads(next((cells / "student-5").glob("quiz.*.json")).read_text())
    assert [i["id"] for i in quiz["items"]] == list(range(5)) and all(len(i["ll"]) == 3 for i in quiz["items"])
    assert quiz["items"][0]["prompt"].endswith("Question: item 0?") and "xyz" in [c.strip() for c in quiz["items"][0]["choices"]]
    assert main(["compare", str(tmp_path / "results"), "--items", "student-5", "teacher-8", "--task", "quiz",
                 "--out", str(tmp_path / "items")]) == 0
    printed = capsys.readouterr().out
    mine = {m: [int(i["scores"]["acc"]) for i in json.loads(next((cells / m).glob("quiz.*.json")).read_text())["items"]]
            for m in ("student-5", "teacher-8")}
    hand = sum(a and not b for a, b in zip(mine["student-5"], mine["teacher-8"], strict=True))
    assert f"only student-5 {hand}," in printed and "McNemar exact test" in printed
    assert len(read_csv(tmp_path / "items" / "items-student-5-teacher-8-quiz.csv")) == 5
    # a cell measured before items were kept is measured again, once, to the same numbers
    path = next((cells / "student-5").glob("quiz.*.json"))
    old = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "items"}))
    assert main(argv) == 0
    assert "1 cells computed, 34 already on disk" in capsys.readouterr().out
    assert json.loads(path.read_text())["metrics"] == old["metrics"]
    assert main([*argv[:-2], "--out", str(tmp_path / "results"), "--limit", "2"]) == 0
    assert "21 cells computed, 14 already on disk" in capsys.readouterr().out  # a new limit: new lm-eval cells only


def test_cells_land_cheap_and_telling_first_and_each_cells_rows_are_heard_as_it_lands(tmp_path):
    """The standard order: the family's label-free cells, its tasks, its cost, then the baselines'; `on_rows` hears
    every cell's rows as it lands, and together they are the report's rows."""
    from boomerang.evaluation.run import EvalRequest, evaluate_student

    save_tiny_teacher(tmp_path / "teacher", "llama")
    main(["cut", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")])
    data = write_eval_files(tmp_path / "data")
    (tmp_path / "held.txt").write_text("Held-out text for label-free metrics. " * 80)
    heard: list[list[dict]] = []
    req = EvalRequest(student=str(tmp_path / "student"), tasks=["quiz"], data_dir=str(data), baselines=["undistilled"],
                      heldout_data=str(tmp_path / "held.txt"), cost=True, sizes="5,7,8", out=str(tmp_path / "results"))
    report = evaluate_student(req, on_rows=heard.append)
    assert len(heard) == report.total == 5 * 3  # 3 sizes + 2 undistilled, 3 cells each
    order = [(rows[0]["series"], rows[0]["task"]) for rows in heard]
    family = [task for series, task in order[:9]]
    assert family == ["heldout"] * 3 + ["quiz"] * 3 + ["cost"] * 3  # every size's KL before any task
    assert {series for series, _ in order[:9]} == {"student", "interpolated", "teacher"}
    assert order[9:] == [("undistilled", "heldout")] * 2 + [("undistilled", "quiz")] * 2 + [("undistilled", "cost")] * 2
    ident = {(r["key"], r["task"], r["metric"], r["value"]) for rows in heard for r in rows}
    assert ident == {(r["key"], r["task"], r["metric"], r["value"]) for r in report.rows}
    heard.clear()  # resumed: cells already on disk are heard too (a chart made from a resumed job is complete)
    evaluate_student(req, on_rows=heard.append)
    assert len(heard) == 15 and {(r["key"], r["task"], r["metric"], r["value"]) for rows in heard for r in rows} == ident


def test_a_task_is_scored_for_the_family_and_for_the_baselines_as_two_groups_and_a_stop_mid_group_keeps_none(tmp_path):
    """The first family cell of a task scores every size (the family's group); the baselines are the next group; a stop
    asked while a group is scored ends the evaluation there with none of that group's cells written."""
    from boomerang.evaluation import shared
    from boomerang.evaluation.run import EvalRequest, evaluate_student

    save_tiny_teacher(tmp_path / "teacher", "llama")
    main(["cut", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")])
    data = write_eval_files(tmp_path / "data")
    groups: list[list[str]] = []
    real = shared.SharedScorer._score

    def spy(self, tokens, max_length):
        groups.append(sorted(self.models))
        return real(self, tokens, max_length)

    shared.SharedScorer._score = spy
    try:
        req = EvalRequest(student=str(tmp_path / "student"), tasks=["quiz"], data_dir=str(data), baselines=["undistilled"],
                          sizes="5,7,8", out=str(tmp_path / "results"))
        stop = {"now": False}
        heard: list[list[dict]] = []

        def on_rows(rows):
            heard.append(rows)
            stop["now"] = True  # once the family's group has landed its cells, ask to stop

        report = evaluate_student(req, on_rows=on_rows, should_stop=lambda: stop["now"])
        assert groups == [["interpolated-7", "student-5", "teacher-8"]]  # one scoring for the three sizes
        assert report.computed == 1  # the stop came after the first cell
        groups.clear()
        # resumed: the two sizes left are one group, the baselines another; stopped while the baselines are scored
        report = evaluate_student(req, should_stop=lambda: len(groups) == 2)
        assert groups == [["interpolated-7", "teacher-8"], ["undistilled-5", "undistilled-7"]]
        assert report.computed == 2 and not list((tmp_path / "results" / "cells").glob("undistilled-*/quiz.*.json"))
        groups.clear()
        assert evaluate_student(req).computed == 2 and groups == [["undistilled-5", "undistilled-7"]]
    finally:
        shared.SharedScorer._score = real


def test_share_out_keeps_models_scored_together_and_balances_layers():
    from boomerang.evaluation.results import ModelEntry
    from boomerang.evaluation.run import Candidate, share_out

    def cand(key, series, n, shared=True):
        return Candidate(ModelEntry(key, series, n, n * 10, n * 8), lambda: None, shared=shared)

    family = [cand(f"s{n}", "interpolated", n) for n in (5, 6, 7, 8)]
    baselines = [cand(f"b{n}", "drop-bi", n) for n in (5, 6, 7)]
    distilled = [cand("d6", "distilled", 6, shared=False)]
    every = family + baselines + distilled
    assert share_out(every, 1) == [[c.entry.key for c in family + baselines + distilled]]
    two = share_out(every, 2)  # family (26 layers) alone; the baselines (18) with the distilled student (6)
    assert two == [["s5", "s6", "s7", "s8"], ["b5", "b6", "b7", "d6"]]
    four = share_out(every, 4)  # three groups < four parts: the family is halved, smaller sizes in one half
    assert sorted(map(sorted, four)) == sorted([["s5", "s6", "s7"], ["s8"], ["b5", "b6", "b7"], ["d6"]])
    many = share_out(every, 12)  # more parts than models: some parts are empty, every model is in exactly one part
    assert sorted(k for part in many for k in part) == sorted(c.entry.key for c in every) and [] in many
    assert share_out(every, 4) == four  # the same plan in every process


def test_an_evaluation_run_in_parts_then_gathered_equals_one_run(tmp_path, capsys):
    """`--part I/N` computes that part's cells (no cost, no table); the same command without it finds them, times cost
    and writes the report: the same numbers as in one run. `--parts` is for queued jobs and is refused here."""
    save_tiny_teacher(tmp_path / "teacher", "llama")
    main(["cut", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")])
    data = write_eval_files(tmp_path / "data")
    (tmp_path / "held.txt").write_text("Held-out text for label-free metrics. " * 80)
    argv = ["eval", str(tmp_path / "student"), "--tasks", "quiz", "--data-dir", str(data), "--baselines",
            "undistilled", "--heldout-data", str(tmp_path / "held.txt"), "--cost", "--sizes", "5,7,8", "--dtype", "float32"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "parts"), "--part", "2/2"]) == 0
    out = capsys.readouterr().out
    assert "4 cells computed, 0 already on disk (part 2/2: run the same command without --part" in out  # 2 baselines
    assert not (tmp_path / "parts" / "family.csv").exists()
    assert main([*argv, "--out", str(tmp_path / "parts"), "--part", "1/2"]) == 0
    assert "6 cells computed" in capsys.readouterr().out  # 3 sizes x (held-out, quiz)
    assert main([*argv, "--out", str(tmp_path / "parts")]) == 0
    assert "5 cells computed, 10 already on disk" in capsys.readouterr().out  # only cost: 5 models
    one, parts = read_csv(tmp_path / "one" / "family.csv"), read_csv(tmp_path / "parts" / "family.csv")
    pick = lambda rows: {(r["key"], r["task"], r["metric"]): r["value"] for r in rows if r["task"] != "cost"}  # noqa: E731
    assert pick(one) == pick(parts) and len(pick(one)) == 5 * 5
    for flags, message in ((["--parts", "2"], "shares out a queued evaluation over workers"),
                           (["--part", "3/2"], "part must be I/N with 1 <= I <= N"),
                           (["--part", "1/2", "--parts", "2"], "not both")):
        assert main([*argv, "--out", str(tmp_path / "refused"), *flags]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
