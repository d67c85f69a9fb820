"""Tiny random models of every supported architecture, for fast tests against references."""

from __future__ import annotations

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

VOCAB = 97
N_LAYERS = 8

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=True),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=3, tie_word_embeddings=True),
    "qwen3": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=6, query_pre_attn_scalar=8),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=6, query_pre_attn_scalar=8, sliding_window_pattern=3),
    "phi3": dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": dict(_COMMON, head_dim=8, no_rope_layer_interval=3, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # (NoPE at layers 2 and 5)
    # mixtures of experts: 4 experts, 2 a token; Qwen-MoE with dense layers among sparse ones, so a cut or a patched
    # size mixes the two kinds at new positions
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "olmoe": dict(_COMMON, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      decoder_sparse_step=2, mlp_only_layers=[4]),
    "qwen2_moe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, mlp_only_layers=[1, 6]),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                     num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
}


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**CONFIGS[model_type])
    config._attn_implementation = "eager" if model_type.startswith("gemma") else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def tiny_tokenizer():
    """A character-level tokenizer over printable ASCII whose vocabulary fits the tiny models (97)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 126):
        vocab[chr(code)] = len(vocab)
    assert len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def save_tiny_teacher(folder, model_type: str = "llama", seed: int = 0):
    """A tiny random teacher saved as a local Hugging Face folder, with a tokenizer."""
    model = tiny_model(model_type, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model
