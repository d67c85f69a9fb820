"""Memory known before launch: the estimate from the config alone against the peak a real run reaches on this
CPU (within ±20 %), on the default teacher and on two tiny configs, one with Qwen's 151,936-token vocabulary,
with and without chunked losses (each measurement a fresh process: marked slow, run by CI after the default
suite); a run that cannot fit is refused before the teacher loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from boomerang.errors import BoomerangError
from boomerang.training.measure import MEASURE_ENV
from boomerang.training.memory import estimate_memory, parameter_counts
from boomerang.training.recipe import DistillConfig
from tiny import tiny_tokenizer

TEXT = ("The boomerang came back to the hand that threw it, and the crowd cheered. " * 30 + "\n") * 40
SHAPES = {
    "wide": dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8),
    "qwen-vocab": dict(vocab_size=151936, hidden_size=64, intermediate_size=256, num_hidden_layers=4),
    "deep": dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=16),  # activations dominate
}


def teacher_folder(tmp_path, shape: str) -> str:
    folder = tmp_path / shape
    config = CONFIG_MAPPING["llama"](**SHAPES[shape], num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def measured_and_estimated(tmp_path, teacher: str, **settings) -> tuple[int, int]:
    """The peak a fresh process reaches (teacher loaded, student cut, two optimizer steps) and the estimate."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = dict(teacher=teacher, data=str(tmp_path / "corpus.txt"), out=str(tmp_path / f"run-{len(os.listdir(tmp_path))}"),
               steps=2, checkpoint_every=1000, device="cpu", **{"seq_len": 128, **settings})
    code = ("import json, sys; from boomerang.training.measure import measure_peak; "
            "from boomerang.training.recipe import DistillConfig; "
            "print('PEAK', measure_peak(DistillConfig.from_dict(json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, **MEASURE_ENV, "OMP_NUM_THREADS": "2"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = int(r.stdout.split("PEAK")[-1])
    from boomerang.training.memory import estimate_for

    return peak, estimate_for(DistillConfig.from_dict(cfg)).total


@pytest.mark.slow
@pytest.mark.parametrize("shape, settings", [("wide", dict(batch_size=8)), ("qwen-vocab", dict(batch_size=4))])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, shape, settings):
    peak, estimate = measured_and_estimated(tmp_path, teacher_folder(tmp_path, shape), **settings)
    assert 0.8 < estimate / peak < 1.2, (shape, peak / 2**20, estimate / 2**20)


@pytest.mark.slow
def test_chunked_losses_cut_the_peak_of_a_large_vocabulary_and_the_estimate_follows(tmp_path):
    teacher = teacher_folder(tmp_path, "qwen-vocab")
    whole, whole_est = measured_and_estimated(tmp_path, teacher, batch_size=4)
    chunked, chunked_est = measured_and_estimated(tmp_path, teacher, batch_size=4, loss_chunk=16)
    assert chunked < 0.7 * whole, (whole / 2**20, chunked / 2**20)  # measured: 2,848 -> ~1,650 MiB
    assert 0.8 < chunked_est / chunked < 1.2 and chunked_est < whole_est


@pytest.mark.slow
def test_activation_checkpointing_cuts_the_peak_of_a_deep_student_and_the_estimate_follows(tmp_path):
    teacher = teacher_folder(tmp_path, "deep")
    kept, kept_est = measured_and_estimated(tmp_path, teacher, batch_size=8, seq_len=256)
    ckpt, ckpt_est = measured_and_estimated(tmp_path, teacher, batch_size=8, seq_len=256, checkpointing=True)
    assert ckpt < 0.7 * kept, (kept / 2**20, ckpt / 2**20)  # measured: 847 -> 436 MiB
    assert 0.8 < kept_est / kept < 1.2 and 0.8 < ckpt_est / ckpt < 1.2


@pytest.mark.slow
def test_the_estimate_follows_bf16_autocast(tmp_path):
    """Under bf16 autocast (forced: the suite pins `auto` to float32) activations cost less, not half."""
    peak, estimate = measured_and_estimated(tmp_path, teacher_folder(tmp_path, "deep"), batch_size=8, seq_len=256,
                                            precision="bf16")
    assert 0.8 < estimate / peak < 1.2, (peak / 2**20, estimate / 2**20)  # measured 710 MiB


@pytest.mark.slow
@pytest.mark.real
def test_the_estimate_is_within_20_percent_on_the_default_teacher(tmp_path):
    peak, estimate = measured_and_estimated(tmp_path, "default", batch_size=4)
    assert 0.8 < estimate / peak < 1.2, (peak / 2**20, estimate / 2**20)


def test_a_big_teacher_is_estimated_from_its_config_alone():
    """Qwen3-8B's published shape, on the meta device: nothing is allocated, the count is the model card's."""
    config = CONFIG_MAPPING["qwen3"](vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     tie_word_embeddings=False, max_position_embeddings=40960)
    kept = list(DistillConfig.from_dict({"device": "cpu"}).plan_for(36).kept)
    teacher, student = parameter_counts(config, kept)
    assert abs(teacher - 8.19e9) < 0.02e9  # "8.2B" on the model card
    cfg = DistillConfig.from_dict({"device": "cpu", "batch_size": 8, "seq_len": 2048})
    est = estimate_memory(config, kept, cfg, device="cuda", available=80 * 2**30)
    assert est.fits is False and est.parts["optimizer (AdamW)"] == 2 * student * 4
    assert any("--loss-chunk" in a for a in est.advice) and any("--fsdp" in a for a in est.advice)
    assert any("--checkpointing" in a for a in est.advice) and any("--optimizer adamw8bit" in a for a in est.advice)
    eight = estimate_memory(config, kept, DistillConfig.from_dict({"device": "cpu", "batch_size": 8, "seq_len": 2048,
                                                                   "optimizer": "adamw8bit"}), device="cuda")
    assert eight.parts["optimizer (AdamW)"] == 2 * student  # a byte per moment
    sharded = estimate_memory(config, kept, DistillConfig.from_dict({"device": "cpu", "batch_size": 1, "seq_len": 2048,
                                                                     "processes": 8, "fsdp": True, "loss_chunk": 256,
                                                                     "dtype": "bfloat16"}),
                              device="cuda", available=80 * 2**30)
    assert sharded.fits is True, sharded.table()


def test_a_run_that_cannot_fit_is_refused_before_the_teacher_loads(tmp_path, monkeypatch):
    import boomerang.training.loop as loop

    teacher = teacher_folder(tmp_path, "qwen-vocab")
    (tmp_path / "corpus.txt").write_text(TEXT)
    loaded = []
    monkeypatch.setattr(loop, "load_teacher", lambda *a, **k: loaded.append(1))
    cfg = DistillConfig.from_dict(dict(teacher=teacher, data=str(tmp_path / "corpus.txt"), out=str(tmp_path / "r"),
                                       device="cpu", batch_size=4096, seq_len=256, steps=1))
    with pytest.raises(BoomerangError, match=r"needs about [\d.]+ GiB per device \(.*logits.*To fit: chunked losses"):
        loop.distill(cfg)
    assert not loaded and not (tmp_path / "r").exists()


def test_an_8bit_optimizer_is_refused_where_it_cannot_run_before_the_teacher_loads(tmp_path, monkeypatch):
    import boomerang.training.loop as loop

    with pytest.raises(BoomerangError, match="optimizer must be one of adamw, adamw8bit, got 'sgd'"):
        DistillConfig.from_dict({"optimizer": "sgd"})
    (tmp_path / "corpus.txt").write_text(TEXT)
    loaded = []
    monkeypatch.setattr(loop, "load_teacher", lambda *a, **k: loaded.append(1))
    cfg = DistillConfig.from_dict(dict(teacher=teacher_folder(tmp_path, "wide"), data=str(tmp_path / "corpus.txt"),
                                       out=str(tmp_path / "r"), device="cpu", steps=1, optimizer="adamw8bit"))
    with pytest.raises(BoomerangError, match="--optimizer adamw8bit runs on CUDA only .*this run is on cpu; use "
                                             "--optimizer adamw"):
        loop.distill(cfg)
    assert not loaded and not (tmp_path / "r").exists()


def test_distill_estimate_prints_the_parts_and_loads_nothing(tmp_path, capsys):
    from boomerang.cli import main

    teacher = teacher_folder(tmp_path, "wide")
    assert main(["distill", "--estimate", "--teacher", teacher, "--data", "nowhere.txt", "--device", "cpu",
                 "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    for part in ("teacher weights", "optimizer (AdamW)", "activations", "logits", "total", "fits"):
        assert part in text
    assert main(["distill", "--estimate", "--json", "--teacher", teacher, "--device", "cpu", "--out",
                 str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    assert not (tmp_path / "r").exists()
