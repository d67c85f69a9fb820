"""One small adapter per architecture family: where the layers, embeddings, final norm and head live.

Everything that cuts or patches a model goes through `adapter_for(model_or_config)` so that no other
module needs to know that GPT-2 calls its layers `transformer.h` and Pythia its head `embed_out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from boomerang.errors import BoomerangError

if TYPE_CHECKING:
    from transformers import PreTrainedModel as CausalLM
else:  # importing transformers' model classes costs a second: at run time the name only annotates
    CausalLM = nn.Module
"""A causal LM as transformers builds it (what a teacher, a student and every size are): it has `.config`."""


@dataclass(frozen=True)
class Arch:
    """Where the parts of a `*ForCausalLM` model of one family live."""

    family: str
    """Human name of the family, shown in listings and errors."""
    model_types: tuple[str, ...]
    """`config.model_type` values this adapter handles."""
    base: str
    """Attribute of the causal-LM wrapper holding the base (decoder) model."""
    layers: str
    """Attribute of the base model holding the `nn.ModuleList` of decoder layers."""
    embeddings: tuple[str, ...]
    """Attributes of the base model holding input embeddings (token, and absolute position if any)."""
    norm: str
    """Attribute of the base model holding the final norm."""
    head: str
    """Attribute of the causal-LM wrapper holding the output projection."""
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    """Config fields that are lists with one entry per layer; cut and patched with the layers."""

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers)

    def token_embedding(self, model: nn.Module) -> nn.Embedding:
        return getattr(self.base_model(model), self.embeddings[0])

    def head_module(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.head)

    def end_modules(self, model: nn.Module) -> dict[tuple[str, ...], nn.Module]:
        """The non-layer modules with weights, keyed by their path from the wrapper."""
        base = self.base_model(model)
        ends: dict[tuple[str, ...], nn.Module] = {(self.base, name): getattr(base, name)
                                                  for name in (*self.embeddings, self.norm)}
        ends[(self.head,)] = getattr(model, self.head)
        return ends

    def check(self, config) -> None:
        """Refuse configurations whose layers depend on their position in a way a cut cannot keep."""
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise BoomerangError(
                "this GPT-2 model scales attention by 1/(layer index + 1) "
                "(scale_attn_by_inverse_layer_idx=True): a layer moved to another position would "
                "compute something else, so it cannot be cut or patched"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise BoomerangError("encoder-decoder models are not supported: use a decoder-only model")


_LLAMA_LIKE: dict = dict(base="model", layers="layers", embeddings=("embed_tokens",), norm="norm", head="lm_head")

ARCHES: tuple[Arch, ...] = (
    Arch("Llama (incl. SmolLM2, Llama 3)", ("llama",), **_LLAMA_LIKE),
    Arch("Mistral", ("mistral",), **_LLAMA_LIKE),
    Arch("Qwen2", ("qwen2",), **_LLAMA_LIKE),
    Arch("Qwen3", ("qwen3",), **_LLAMA_LIKE),
    Arch("Gemma 2", ("gemma2",), **_LLAMA_LIKE),
    Arch("Gemma 3 (text)", ("gemma3_text",), **_LLAMA_LIKE),
    Arch("Phi-3", ("phi3",), **_LLAMA_LIKE),
    Arch(
        "GPT-NeoX (Pythia)", ("gpt_neox",),
        base="gpt_neox", layers="layers", embeddings=("embed_in",), norm="final_layer_norm", head="lm_head",
    ),
    Arch("GPT-2", ("gpt2",), base="transformer", layers="h", embeddings=("wte", "wpe"), norm="ln_f", head="lm_head"),
)


def intermediate_size(config) -> int:
    """The width of a layer's MLP (GPT-2 calls it `n_inner`, and leaves it unset for 4 x hidden)."""
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHES for t in arch.model_types)


def adapter_for(model_or_config) -> Arch:
    """The adapter for a model or config; a `BoomerangError` listing what is supported otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for arch in ARCHES:
        if model_type in arch.model_types:
            arch.check(config)
            return arch
    families = "; ".join(f"{a.family} [{', '.join(a.model_types)}]" for a in ARCHES)
    raise BoomerangError(
        f"unsupported architecture {model_type!r}. Supported: {families}. "
        "Adding one is a few lines in boomerang/arch.py."
    )
