import pytest
from transformers import BertConfig, GPT2Config

from boomerang.arch import adapter_for, supported_model_types
from boomerang.errors import BoomerangError


def test_every_required_family_is_supported():
    for model_type in ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2"]:
        assert model_type in supported_model_types()


def test_unsupported_architecture_lists_what_is_supported():
    with pytest.raises(BoomerangError) as err:
        adapter_for(BertConfig())
    assert "unsupported architecture 'bert'" in str(err.value)
    assert "Qwen3 [qwen3]" in str(err.value) and "GPT-2 [gpt2]" in str(err.value)


def test_gpt2_with_position_dependent_attention_scaling_is_refused():
    with pytest.raises(BoomerangError, match="scale_attn_by_inverse_layer_idx"):
        adapter_for(GPT2Config(scale_attn_by_inverse_layer_idx=True))
