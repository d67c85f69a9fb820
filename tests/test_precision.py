"""bfloat16 where the CPU does it well: what auto resolves to, teachers loaded in bf16, bf16 against fp32 on the
real teacher within the bounds docs/benchmarks.md states, bf16 autocast distillation, and evaluation cells keyed
by dtype.

The suite pins `auto` to float32 (conftest: BOOMERANG_DTYPE) so the exactness tests elsewhere compare float32
with float32; these tests take the pin off where they test `auto` itself.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from boomerang import data as d
from boomerang import precision
from boomerang.errors import BoomerangError
from boomerang.evaluation.metrics import label_free_many
from boomerang.family import Family
from boomerang.plan import LayerPlan, PaperRule
from boomerang.student import cut_student
from boomerang.training.recipe import DistillConfig
from tiny import save_tiny_teacher

BF16_KL_BOUND = 0.01
"""KL(fp32 || bf16) of the default teacher on the shipped general text, at most (measured 0.004: bench/bench_bf16.py
and docs/benchmarks.md)."""
BF16_TOP1_BOUND = 0.95
"""Top-1 agreement of the teacher in bf16 with itself in fp32, at least (measured 0.976)."""
BF16_SHARE_BOUND = 0.1
"""A size's KL(fp32 || bf16), at most this share of its KL to the teacher (measured at most 0.05 on the
undistilled sizes, whose distributions are the least settled)."""


@pytest.fixture
def unpinned(monkeypatch, tmp_path):
    """`auto` as a user gets it: no BOOMERANG_DTYPE, a fresh machine record, nothing cached."""
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path))
    precision.cpu_bf16_speedup.cache_clear()
    yield tmp_path
    precision.cpu_bf16_speedup.cache_clear()


def fake_cpu(monkeypatch, flags: str, speedup: float) -> list[int]:
    calls = []
    monkeypatch.setattr(precision, "_cpuinfo", lambda: f"model name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n")

    def measure():
        calls.append(1)
        return speedup

    monkeypatch.setattr(precision, "measure_cpu_speedup", measure)
    return calls


def another_machine(home) -> None:
    precision.cpu_bf16_speedup.cache_clear()
    (home / precision.FILE).unlink(missing_ok=True)


def test_auto_is_bf16_only_where_the_cpu_has_it_and_it_measured_faster(unpinned, monkeypatch):
    calls = fake_cpu(monkeypatch, "avx2", 3.0)  # no native bf16: emulated, never chosen, never measured
    assert precision.cpu_bf16_flags() == [] and precision.auto_dtype("cpu") == "float32" and not calls
    another_machine(unpinned)
    fake_cpu(monkeypatch, "avx512f avx512_bf16", 1.05)  # native but slower than the bar
    assert precision.auto_dtype("cpu") == "float32"
    another_machine(unpinned)
    fake_cpu(monkeypatch, "avx512f amx_bf16", 1.8)
    assert precision.auto_dtype("cpu") == "bfloat16"
    assert "amx_bf16" in precision.describe("cpu") and "1.80x" in precision.describe("cpu")
    assert precision.resolve("auto") == "bfloat16" and precision.resolve("fp32") == "float32"
    assert precision.auto_dtype("mps") == "float32"


def test_the_measurement_is_made_once_per_machine_and_kept(unpinned, monkeypatch):
    calls = fake_cpu(monkeypatch, "avx512_bf16", 1.7)
    assert precision.auto_dtype("cpu") == "bfloat16"
    record = json.loads((unpinned / precision.FILE).read_text())["cpu_bf16"]
    assert record["speedup"] == 1.7 and "Test CPU" in record["key"] and torch.__version__ in record["key"]
    precision.cpu_bf16_speedup.cache_clear()  # a new process: reads the record, measures nothing
    assert precision.auto_dtype("cpu") == "bfloat16" and len(calls) == 1
    record["key"] = "another CPU"  # another machine (or torch, or thread count): measured again
    (unpinned / precision.FILE).write_text(json.dumps({"cpu_bf16": record}))
    precision.cpu_bf16_speedup.cache_clear()
    precision.auto_dtype("cpu")
    assert len(calls) == 2


def test_the_environment_overrides_auto_and_bad_names_are_refused(unpinned, monkeypatch):
    fake_cpu(monkeypatch, "avx512_bf16", 2.0)
    monkeypatch.setenv(precision.ENV, "float32")
    assert precision.auto_dtype("cpu") == "float32" and "BOOMERANG_DTYPE" in precision.describe()
    monkeypatch.setenv(precision.ENV, "fp8")
    with pytest.raises(BoomerangError, match="unknown dtype 'fp8'"):
        precision.auto_dtype("cpu")
    with pytest.raises(BoomerangError, match="precision must be one of auto, bf16, fp32"):
        DistillConfig(precision="half")


def test_distillation_autocasts_where_auto_says(unpinned, monkeypatch):
    fake_cpu(monkeypatch, "avx512_bf16", 2.0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert DistillConfig().autocast_dtype(cpu) == torch.bfloat16
    assert DistillConfig(precision="fp32").autocast_dtype(cpu) is None
    assert DistillConfig(precision="auto").autocast_dtype(cuda) == torch.bfloat16  # as before on GPUs
    another_machine(unpinned)
    fake_cpu(monkeypatch, "avx2", 2.0)
    assert DistillConfig().autocast_dtype(cpu) is None
    assert DistillConfig(precision="bf16").autocast_dtype(cpu) == torch.bfloat16  # asked for: done even emulated


@pytest.mark.real
def test_a_teacher_loaded_in_bf16_keeps_its_fingerprint_and_rotary_frequencies(default_teacher):
    from boomerang.models import load_teacher

    low = load_teacher("default", dtype="bfloat16")
    assert low.fingerprint == default_teacher.fingerprint  # its student folders open in either dtype
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in low.model.buffers()} == {torch.float32}  # as from_pretrained(dtype=bf16) keeps them
    ref = {n: p for n, p in default_teacher.model.named_parameters()}
    for name, p in low.model.named_parameters():
        torch.testing.assert_close(p, ref[name].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.real
def test_bf16_agrees_with_fp32_on_the_real_teacher_within_the_stated_bounds(default_teacher):
    """Every size of the default teacher's cut family, on held-out text: the bounds docs/benchmarks.md states."""
    from boomerang.models import load_teacher

    low = load_teacher("default", dtype="bfloat16")
    plan = LayerPlan.from_rule(default_teacher.n_layers, PaperRule())
    fams = [Family(t.model, cut_student(t.model, plan, share=True), plan) for t in (default_teacher, low)]
    blocks = d.general_blocks(d.SHIPPED_GENERAL, default_teacher.tokenizer, 1024)
    teacher = label_free_many({"bf16": low.model}, default_teacher.model, blocks)["bf16"]
    assert 0 < teacher.kl_to_teacher < BF16_KL_BOUND and teacher.top1_agreement > BF16_TOP1_BOUND, teacher
    for n in (plan.n_student, (plan.n_student + plan.n_teacher) // 2, plan.n_teacher - 1):
        ref = fams[0].build(n)
        moved = label_free_many({"bf16": fams[1].build(n)}, ref, blocks)["bf16"].kl_to_teacher
        away = label_free_many({"fp32": ref}, default_teacher.model, blocks)["fp32"].kl_to_teacher
        assert 0 < moved < BF16_SHARE_BOUND * away, (n, moved, away)


def test_bf16_autocast_distillation_steps_stay_close_to_fp32(tmp_path):
    from boomerang.training.loop import distill

    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    reports: dict[str, list] = {"fp32": [], "bf16": []}
    for prec, seen in reports.items():
        distill(DistillConfig(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "corpus.txt"), out=str(tmp_path / prec),
                              steps=3, batch_size=2, seq_len=16, lr=1e-3, precision=prec), on_step=seen.append)
    for a, b in zip(reports["fp32"], reports["bf16"], strict=True):
        assert b.loss == pytest.approx(a.loss, rel=0.03), (a.step, a.loss, b.loss)
    assert [r.loss for r in reports["bf16"]] != [r.loss for r in reports["fp32"]]  # the autocast really ran


def test_evaluation_cells_are_keyed_by_dtype_and_float32_keys_are_unchanged():
    from boomerang.evaluation.results import cell_key
    from boomerang.evaluation.run import plan_cells

    class Cand:
        def __init__(self):
            self.entry = type("E", (), {"key": "m", "series": "student"})()

    blocks = {"general": torch.arange(12).reshape(2, 6)}
    f32 = plan_cells([Cand()], [], None, None, blocks, True)
    b16 = plan_cells([Cand()], [], None, None, blocks, True, dtype="bfloat16")
    digest = hashlib.sha256(blocks["general"].numpy().tobytes()).hexdigest()[:12]
    assert f32[0].key == cell_key({"general": digest}, {})  # the key every earlier float32 result has
    assert {j.key for j in f32}.isdisjoint({j.key for j in b16})  # bf16 numbers never mix with them
