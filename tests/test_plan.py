import pytest

from boomerang.errors import BoomerangError
from boomerang.plan import LayerPlan, PaperRule, parse_layer_list


def test_paper_rule_on_a_30_layer_teacher_keeps_16():
    plan = LayerPlan.from_rule(30)
    assert plan.kept == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29)
    assert plan.spans[0] == (0, 2) and plan.spans[-2] == (28, 29) and plan.spans[-1] == (29, 30)
    assert plan.patchable == tuple(range(14))
    assert plan.alignment[0] == (0, 1) and plan.alignment[-1] == (15, 29)
    assert plan.n_layers(set()) == 16 and plan.n_layers(set(range(16))) == 30


def test_spans_cover_every_teacher_layer_once():
    for rule in (PaperRule(), PaperRule(2, 3, 1), PaperRule(1, 4, 0)):
        plan = LayerPlan.from_rule(23, rule)
        covered = [i for a, b in plan.spans for i in range(a, b)]
        assert covered == list(range(23))


def test_layers_after_patching_replaces_a_student_layer_by_its_span():
    plan = LayerPlan(6, (0, 3, 5))
    assert plan.layers_after_patching({0}) == [("teacher", 0), ("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2)]


@pytest.mark.parametrize("kept, message", [
    ((), "keeps no layers"),
    ((1, 3), "must keep layer 0"),
    ((0, 3, 3), "increasing with no repeats"),
    ((0, 4, 2), "increasing with no repeats"),
    ((0, 12), r"layers \[12\] do not exist: the teacher has layers 0..9"),
    (tuple(range(10)), "nothing to distill"),
])
def test_bad_explicit_plans_say_what_to_fix(kept, message):
    with pytest.raises(BoomerangError, match=message):
        LayerPlan(10, kept)


@pytest.mark.parametrize("rule, message", [
    (dict(keep_first=0), "keep-first must be at least 1"),
    (dict(every=0), "every must be at least 1"),
    (dict(keep_last=-1), "keep-last must be 0 or more"),
])
def test_bad_rules_name_the_flag(rule, message):
    with pytest.raises(BoomerangError, match=message):
        PaperRule(**rule)


def test_rule_too_big_for_the_teacher():
    with pytest.raises(BoomerangError, match="more than the teacher's 4 layers"):
        LayerPlan.from_rule(4, PaperRule(keep_first=3, keep_last=2))


def test_parse_layer_list():
    assert parse_layer_list("0, 2,4-6,9") == [0, 2, 4, 5, 6, 9]
    with pytest.raises(BoomerangError, match="cannot read 'x'"):
        parse_layer_list("0,x")
    with pytest.raises(BoomerangError, match="cannot read '5-2'"):
        parse_layer_list("5-2")


def test_importance_plan_drops_the_cheapest_layers_within_its_limits():
    from boomerang.plan import importance_plan

    #        0    1    2    3    4    5    6    7    8    9
    costs = [9.0, 0.1, 0.2, 0.3, 5.0, 0.4, 0.5, 0.6, 0.05, 8.0]
    # 4 of 10 dropped: 8 is in the last 2, so 1, 2 (a run of 2), then 3 would make a run of 3: skipped; 5, 6
    plan = importance_plan(costs, 6, keep_first=1, keep_last=2, max_run=2)
    assert plan.kept == (0, 3, 4, 7, 8, 9)
    assert plan.spans[0] == (0, 3) and plan.spans[2] == (4, 7)
    assert importance_plan(costs, 8, max_run=1).kept == tuple(i for i in range(10) if i not in (1, 3))
    with pytest.raises(BoomerangError, match="at most 1 in a row"):
        importance_plan(costs, 4, keep_first=1, keep_last=2, max_run=1)
    with pytest.raises(BoomerangError, match="cannot keep 2 of 10"):
        importance_plan(costs, 2)
