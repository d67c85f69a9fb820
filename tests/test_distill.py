"""The distillation loop on a tiny teacher: resume equals uninterrupted, stop, checkpoints, outputs."""

import json

import pytest
import torch
from torch.testing import assert_close

from boomerang.arch import adapter_for
from boomerang.errors import BoomerangError
from boomerang.models import load_teacher
from boomerang.student import load_student
from boomerang.training.checkpoint import CHECKPOINT, METRICS, save_checkpoint
from boomerang.training.loop import distill, setup
from boomerang.training.recipe import DistillConfig, read_recipe
from boomerang.training.terms import blockwise_states
from tiny import save_tiny_teacher, tokens

TEXT = "The quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture
def teacher_dir(tmp_path):
    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tmp_path


def config(tmp, name, **kw):
    base = dict(teacher=str(tmp / "teacher"), data=str(tmp / "corpus.txt"), out=str(tmp / name), steps=4,
                batch_size=2, seq_len=16, lr=1e-3, warmup=0.25, checkpoint_every=100)
    return DistillConfig(**{**base, **kw})


def student_weights(out):
    return torch.load(out / CHECKPOINT, weights_only=True)["student"]


def test_two_steps_stop_resume_two_equals_four_uninterrupted(teacher_dir):
    full = distill(config(teacher_dir, "full"))
    assert full.steps_done == 4 and not full.stopped
    stops = iter([False, True])
    part = distill(config(teacher_dir, "split"), should_stop=lambda: next(stops))
    assert part.stopped and part.steps_done == 2 and part.student_dir is None
    resumed = distill(config(teacher_dir, "split"), resume=True)
    assert resumed.steps_done == 4
    a, b = student_weights(full.out), student_weights(resumed.out)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(line)["step"] for line in (resumed.out / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "a step's metrics were lost or duplicated"
    full_losses = [json.loads(line)["loss"] for line in (full.out / METRICS).read_text().splitlines()]
    split_losses = [json.loads(line)["loss"] for line in (resumed.out / METRICS).read_text().splitlines()]
    assert full_losses == pytest.approx(split_losses, rel=1e-6)


def test_outputs_progress_and_teacher_frozen(teacher_dir):
    teacher = load_teacher(str(teacher_dir / "teacher"))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    reports = []
    result = distill(config(teacher_dir, "run", steps=3), on_step=reports.append, teacher=teacher)
    assert [r.step for r in reports] == [1, 2, 3] and all(r.total == 3 for r in reports)
    r = reports[-1]
    assert r.tokens == 3 * 2 * 16 and r.tokens_per_s > 0 and r.eta_s == 0 and set(r.terms) == {"ce", "kl", "cosine"} and min(r.terms.values()) > 0
    assert reports[0].eta_s > 0
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), f"the teacher changed: {k}"
    assert all(p.grad is None for p in teacher.model.parameters())
    assert not any(h for layer in teacher.model.model.layers for h in layer._forward_hooks.values()), "hooks left behind"
    student, manifest = load_student(result.student_dir, teacher)
    assert manifest.distilled["steps"] == 3 and manifest.distilled["tokens"] == 96
    cut = teacher.model.model.layers[2].mlp.up_proj.weight
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, cut), "the student did not train"
    assert read_recipe(result.out).steps == 3


def test_zero_steps_writes_the_cut_student(teacher_dir):
    result = distill(config(teacher_dir, "zero", steps=0))
    teacher = load_teacher(str(teacher_dir / "teacher"))
    student, manifest = load_student(result.student_dir, teacher)
    assert manifest.distilled is None
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight)


def test_each_loss_can_be_switched_off(teacher_dir):
    reports = []
    distill(config(teacher_dir, "kl-only", steps=1, ce_weight=0, cosine_weight=0), on_step=reports.append)
    assert list(reports[0].terms) == ["kl"] and reports[0].terms["kl"] > 0  # terms switched off are not reported
    assert reports[0].loss == pytest.approx(0.1 * reports[0].terms["kl"])


def test_frozen_embeddings_stay_the_teachers(teacher_dir):
    result = distill(config(teacher_dir, "frozen", steps=2, freeze_embeddings=True))
    teacher = load_teacher(str(teacher_dir / "teacher"))
    student, _ = load_student(result.student_dir, teacher)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)


def test_a_crash_while_checkpointing_keeps_the_last_good_one(teacher_dir, monkeypatch):
    stops = iter([True])
    result = distill(config(teacher_dir, "crash"), should_stop=lambda: next(stops))
    good = student_weights(result.out)
    run = setup(config(teacher_dir, "crash"), resume=True)

    def dies_half_way(obj, path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(BoomerangError, match="could not write the checkpoint of step 99 .*freed the partial file"):
        save_checkpoint(run, 99)
    monkeypatch.undo()
    assert sorted(p.name for p in result.out.iterdir() if p.name.startswith(".")) == [], "a partial file was left"
    state = torch.load(result.out / CHECKPOINT, weights_only=True)
    assert state["step"] == 1 and all(torch.equal(good[k], state["student"][k]) for k in good)


@pytest.mark.parametrize("kw, message", [
    (dict(steps=-1), "steps must be 0 or more"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(ce_weight=0, kl_weight=0, cosine_weight=0), "every loss weight is 0"),
    (dict(warmup=1.5), "warmup is a fraction"),
    (dict(schedule="linear"), "schedule must be cosine or constant"),
    (dict(every=0), "--every must be at least 1"),
])
def test_bad_settings(teacher_dir, kw, message):
    with pytest.raises(BoomerangError, match=message):
        config(teacher_dir, "bad", **kw)


def test_run_folder_rules(teacher_dir):
    distill(config(teacher_dir, "once", steps=1))
    with pytest.raises(BoomerangError, match="already holds a run: pass --resume"):
        distill(config(teacher_dir, "once", steps=1))
    with pytest.raises(BoomerangError, match="no run in .*never: it has no recipe.json"):
        distill(config(teacher_dir, "never"), resume=True)
    with pytest.raises(BoomerangError, match=r"recipe differs from the run's in \['lr'\]"):
        distill(config(teacher_dir, "once", steps=1, lr=5e-4), resume=True)


def test_recipe_file_keys_are_the_config_fields(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"steps": 7, "kl_weight": 0.5}))
    cfg = DistillConfig.from_file(tmp_path / "r.json")
    assert cfg.steps == 7 and cfg.kl_weight == 0.5 and cfg.lr == 3e-4
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 7}))
    with pytest.raises(BoomerangError, match=r"unknown keys \['stepz'\]"):
        DistillConfig.from_file(tmp_path / "bad.json")


def test_mse_term_reported_when_on(teacher_dir):
    reports = []
    distill(config(teacher_dir, "mse", steps=1, mse_weight=1.0), on_step=reports.append)
    t = reports[0].terms
    assert t["mse"] > 0
    assert reports[0].loss == pytest.approx(t["ce"] + 0.1 * t["kl"] + 2 * t["cosine"] + t["mse"], rel=1e-5)


def test_single_blocks_can_stay_the_teachers(teacher_dir):
    result = distill(config(teacher_dir, "single", steps=2, freeze_single_blocks=True))
    teacher = load_teacher(str(teacher_dir / "teacher"))
    student, manifest = load_student(result.student_dir, teacher)
    assert manifest.plan.spans[-1] == (7, 8) and manifest.plan.spans[-2] == (6, 7)
    for j, i in ((3, 6), (4, 7)):  # single-layer spans: untouched
        assert torch.equal(student.model.layers[j].mlp.up_proj.weight, teacher.model.model.layers[i].mlp.up_proj.weight)
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_blockwise_term_runs_each_student_layer_on_its_blocks_teacher_input(tmp_path, model_type):
    # Teacher layer 3 made an identity (its writes into the residual stream zeroed): the block of
    # teacher layers 2-3 is then exactly teacher layer 2, which the student keeps, so its blockwise
    # error must be 0 when (and only when) it is fed the teacher's input to layer 2.
    model = save_tiny_teacher(tmp_path / "teacher", model_type)
    layer = adapter_for(model).layer_list(model)[3]
    for name, p in layer.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight", "c_proj.bias")):
            p.data.zero_()
    model.save_pretrained(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text(TEXT)
    run = setup(config(tmp_path, "run", local_weight=1.0, ce_weight=0, kl_weight=0, cosine_weight=0))
    try:
        assert run.plan.spans[:3] == ((0, 2), (2, 4), (4, 6)) and run.plan.patchable == (0, 1, 2)
        run.student.eval()  # GPT-2's dropout off, so outputs can be compared
        with torch.no_grad():
            run.teacher.model(tokens(2, 12), use_cache=False)
            outs, targets = blockwise_states(run)
        assert_close(outs[1], targets[1], rtol=0, atol=1e-5)
        for k in (0, 2):
            assert (outs[k] - targets[k]).norm() > 0.01 * targets[k].norm(), "a block of two real layers matched"
    finally:
        for handle in run.hooks:
            handle.remove()


def test_blockwise_training_moves_only_patchable_layers_and_lowers_their_error(teacher_dir):
    cfg = config(teacher_dir, "local", steps=8, local_weight=1.0, ce_weight=0, kl_weight=0, cosine_weight=0)
    result = distill(cfg)
    losses = [json.loads(line)["terms"]["local"] for line in (result.out / METRICS).read_text().splitlines()]
    assert losses[-1] < losses[0]
    teacher = load_teacher(cfg.teacher)
    student, _ = load_student(result.student_dir, teacher)
    for j, (a, b) in enumerate(cfg.plan_for(teacher.n_layers).spans):
        moved = not torch.equal(student.model.layers[j].mlp.up_proj.weight, teacher.model.model.layers[a].mlp.up_proj.weight)
        assert moved == (b - a > 1), f"student layer {j} (teacher {a}-{b - 1})"
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)


def test_importance_plan_drops_a_layer_the_teacher_does_not_need_and_resumes_with_it(tmp_path):
    # teacher layer 5 made an identity: dropping it costs nothing, so the importance plan drops it,
    # which the paper's rule (keep 0, 2, 4, 6, 7 of 8) never does
    from boomerang.importance import drop_one_costs

    model = save_tiny_teacher(tmp_path / "teacher", "llama")
    for name, p in adapter_for(model).layer_list(model)[5].named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            p.data.zero_()
    model.save_pretrained(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text(TEXT)
    costs = drop_one_costs(model, tokens(2, 12))
    assert costs[5] == pytest.approx(0, abs=1e-6) and min(c for i, c in enumerate(costs) if i != 5) > 1e-4
    cfg = config(tmp_path, "imp", plan="importance", steps=2)
    stops = iter([True])
    first = distill(cfg, should_stop=lambda: next(stops))
    kept = json.loads((first.out / "plan.json").read_text())["kept"]
    assert 5 not in kept and len(kept) == 5 and kept[0] == 0 and kept[-2:] == [6, 7]
    done = distill(cfg, resume=True)
    teacher = load_teacher(cfg.teacher)
    _, manifest = load_student(done.student_dir, teacher)
    assert list(manifest.plan.kept) == kept


def test_mixed_sizes_are_last_k_sizes_drawn_from_the_seed_and_step():
    from boomerang.plan import LayerPlan
    from boomerang.training.terms import mixed_size

    plan = LayerPlan.from_rule(30)  # patchable student layers 0..13
    cfg = DistillConfig(mix_prob=0.5)
    draws = [mixed_size(cfg, plan, step, 0) for step in range(400)]
    assert draws == [mixed_size(cfg, plan, step, 0) for step in range(400)], "not reproducible"
    mixed = [d for d in draws if d]
    assert 150 < len(mixed) < 250
    for d in mixed:
        k = len(d)
        assert 1 <= k <= 13 and d == set(range(14 - k, 14)), d
    assert {len(d) for d in mixed} == set(range(1, 14))
    assert not any(mixed_size(DistillConfig(), plan, step, 0) for step in range(50))


def test_a_mixed_size_step_trains_the_student_through_the_teachers_blocks(teacher_dir):
    from boomerang.family import Family
    from boomerang.training.loop import loss_step
    from boomerang.training.losses import kl_to_teacher

    run = setup(config(teacher_dir, "mix", ce_weight=0, kl_weight=1.0, cosine_weight=2.0, mix_prob=1.0))
    try:
        ids = tokens(2, 12)
        parts = loss_step(run, ids, {1, 2})  # student layers 1, 2 replaced by teacher layers 2-5
        with torch.no_grad():
            mixed = Family(run.teacher.model, run.student, run.plan).build_patched({1, 2})
            reference = kl_to_teacher(mixed(ids).logits, run.teacher.model(ids).logits, torch.ones_like(ids))
        assert parts.terms["kl"] == pytest.approx(float(reference), rel=1e-5)
        parts.total.backward()
        layers = run.student.model.layers
        assert layers[0].mlp.up_proj.weight.grad is not None, "no gradient through the teacher's blocks"
        assert layers[1].mlp.up_proj.weight.grad is None and layers[2].mlp.up_proj.weight.grad is None
        assert all(p.grad is None for p in run.teacher.model.parameters())
    finally:
        for handle in run.hooks:
            handle.remove()
    with pytest.raises(BoomerangError, match="mix_prob and fsdp"):
        DistillConfig(mix_prob=0.5, fsdp=True)


@pytest.mark.parametrize("settings", [dict(checkpointing=True), dict(loss_chunk=5), dict(checkpointing=True, mix_prob=0.5)])
def test_checkpointing_and_chunked_losses_train_the_same_student(teacher_dir, settings):
    """Activation checkpointing and chunked losses change what is kept in memory, never what is learned: the
    same losses and weights as the plain run after 4 steps (cosine alignment on, so the hooks see recomputed layers)."""
    same = {k: v for k, v in settings.items() if k not in ("checkpointing", "loss_chunk")}
    plain = distill(config(teacher_dir, "plain", cosine_weight=2.0, **same))
    other = distill(config(teacher_dir, "other", cosine_weight=2.0, **settings))
    losses = [[json.loads(line)["loss"] for line in (r.out / METRICS).read_text().splitlines()] for r in (plain, other)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = student_weights(plain.out), student_weights(other.out)
    for k in a:
        assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_run_in_progress_records_its_rate_a_few_steps_in(teacher_dir, monkeypatch):
    """The Launch form's duration line uses the rates of a run still going: recorded after RATE_AFTER_STEPS steps
    (and at every checkpoint), not only when the run ends."""
    from boomerang.training import timing
    from boomerang.training.loop import RATE_AFTER_STEPS

    monkeypatch.setenv("BOOMERANG_HOME", str(teacher_dir / "home"))
    fingerprint = load_teacher(str(teacher_dir / "teacher")).fingerprint
    seen = {}

    def on_step(report):
        seen[report.step] = timing.estimate(fingerprint, "cpu", steps=10, tokens_per_step=32, mixed=False)

    distill(config(teacher_dir, "run", steps=RATE_AFTER_STEPS + 2), on_step=on_step)
    assert all(seen[s] is None for s in range(1, RATE_AFTER_STEPS))
    assert seen[RATE_AFTER_STEPS] is not None and seen[RATE_AFTER_STEPS].parts["training"] > 0
