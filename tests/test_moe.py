"""Mixtures of experts (Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE) and SmolLM3's per-layer NoPE, beyond the family tests
every architecture gets (tests/test_family.py, tests/test_export.py): a whole distillation from the command line,
the kind of each block carried to new positions, the router's auxiliary loss off, memory from the config, and the
refusals."""

from __future__ import annotations

import json

import pytest
import torch
from test_family import make_family
from torch.testing import assert_close
from transformers import CONFIG_MAPPING

from boomerang.arch import adapter_for
from boomerang.cli import main
from boomerang.errors import BoomerangError
from boomerang.models import load_teacher
from boomerang.student import load_student, open_family
from tiny import CONFIGS, N_LAYERS, save_tiny_teacher, tokens

TEXT = "A mixture of experts routes every token to two of its four experts, one character at a time. " * 60


def sparse(layer) -> bool:
    return hasattr(layer.mlp, "experts")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_teacher_distills_and_every_size_keeps_its_blocks_kinds(tmp_path, model_type, capsys):
    model = save_tiny_teacher(tmp_path / "teacher", model_type)
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    config["output_router_logits"] = True  # as some hub configs ship: the student must not train a router loss
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(config))
    (tmp_path / "corpus.txt").write_text(TEXT)
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "corpus.txt"),
                 "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--steps", "3", "--recipe", "paper",
                 "--out", str(tmp_path / "run")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and set(metrics[0]["terms"]) == {"ce", "kl", "cosine"}  # no router term
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    teacher = load_teacher(str(tmp_path / "teacher"))
    student, manifest = load_student(tmp_path / "run" / "student", teacher)  # reloaded from its own config
    kept = manifest.plan.kept
    t_layers = adapter_for(teacher.model).layer_list(teacher.model)
    assert [sparse(layer) for layer in student.model.layers] == [sparse(t_layers[i]) for i in kept]
    assert student.config.output_router_logits is False
    if model_type == "qwen3_moe":  # a dense layer among sparse ones, renumbered
        assert student.config.mlp_only_layers == [j for j, i in enumerate(kept) if not sparse(t_layers[i])]
        assert 0 < len(student.config.mlp_only_layers) < len(kept)
    j = next(j for j, layer in enumerate(student.model.layers) if sparse(layer))
    assert not torch.equal(student.model.layers[j].mlp.gate.weight, t_layers[kept[j]].mlp.gate.weight)  # routers trained
    fam = open_family(tmp_path / "run" / "student", teacher=teacher, order="last")
    x = tokens()
    with torch.no_grad():
        assert_close(fam.family.build(N_LAYERS)(x).logits, teacher.model(x).logits, rtol=0, atol=0)
        for n in fam.family.layer_counts:
            size = fam.family.build(n)
            assert size.config.output_router_logits is False
            assert fam.family.info(n).params == sum(p.numel() for p in size.parameters())
            kinds = [sparse(t_layers[int(name[1:])] if name[0] == "T" else student.model.layers[int(name[1:])])
                     for name in fam.family.info(n).layers]
            assert [sparse(layer) for layer in size.model.layers] == kinds
    # the export of a size is a folder plain transformers builds with the same kind of block at every position
    assert main(["export", "--student", str(tmp_path / "run" / "student"), "--layers", str(N_LAYERS - 1),
                 "--order", "last", "--out", str(tmp_path / "size")]) == 0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "size").eval()
    with torch.no_grad():
        assert_close(reloaded(x).logits, fam.family.build(N_LAYERS - 1)(x).logits, rtol=0, atol=0)
    assert model.config.num_hidden_layers == N_LAYERS


def test_smollm3_keeps_each_blocks_rotary_or_nope_at_its_new_position():
    teacher, student, plan, fam = make_family("smollm3")
    rope = teacher.config.no_rope_layers
    assert rope == [1, 1, 0, 1, 1, 0, 1, 1]  # NoPE at layers 2 and 5
    assert student.config.no_rope_layers == [rope[i] for i in plan.kept]
    for n in fam.layer_counts:
        size = fam.build(n)
        expected = [rope[int(name[1:])] if name[0] == "T" else student.config.no_rope_layers[int(name[1:])]
                    for name in fam.info(n).layers]
        assert size.config.no_rope_layers == expected
        assert [int(layer.self_attn.use_rope) for layer in size.model.layers] == expected


def test_the_memory_estimate_counts_every_expert_and_the_experts_a_token_passes_through():
    from boomerang.training.memory import parameter_counts

    config = CONFIG_MAPPING["mixtral"](**CONFIGS["mixtral"])
    teacher, student = parameter_counts(config, [0, 2, 4, 6, 7])
    model, _, _, _ = make_family("mixtral")
    assert teacher == sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert teacher - student == 3 * per_layer
    from boomerang.arch import active_intermediate_size

    assert active_intermediate_size(config) == 2 * 64  # two experts of 64 a token
    assert active_intermediate_size(CONFIG_MAPPING["qwen2_moe"](**CONFIGS["qwen2_moe"])) == 2 * 16 + 32  # + shared
    assert active_intermediate_size(CONFIG_MAPPING["llama"](**CONFIGS["llama"])) == 64


def test_an_unsupported_mixture_of_experts_and_a_gguf_export_of_one_are_refused_in_one_line(tmp_path):
    config = CONFIG_MAPPING["deepseek_v3"]()
    with pytest.raises(BoomerangError, match=r"unsupported architecture 'deepseek_v3'\. Supported: .*Mixtral") as err:
        adapter_for(config)
    assert "\n" not in str(err.value)
    from boomerang.export import export_size_gguf

    _, _, _, fam = make_family("olmoe")
    with pytest.raises(BoomerangError, match="olmoe models are not written as GGUF here.*convert_hf_to_gguf") as err:
        export_size_gguf(fam, fam.layer_counts[1], tmp_path / "x.gguf", type_="f32", teacher_source="t",
                         student_source="s")
    assert "\n" not in str(err.value) and not (tmp_path / "x.gguf").exists()
