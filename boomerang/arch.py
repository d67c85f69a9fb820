"""One small adapter per architecture family: where the layers, embeddings, final norm and head live.

Everything that cuts or patches a model goes through `adapter_for(model_or_config)` so that no other
module needs to know that GPT-2 calls its layers `transformer.h` and Pythia its head `embed_out`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    layer_config: Callable[[Sequence[nn.Module]], dict] | None = None
    """Config fields that say what each layer is, read back from the layers themselves (a sparse or dense MLP, a
    layer without rotary embeddings): so that a model of these layers, saved and loaded again, builds each
    position as the block that runs there. Fields of the config that the layers decide at construction by their
    index (Qwen-MoE's `mlp_only_layers` and `decoder_sparse_step`) are rewritten as an explicit list."""
    moe: bool = False
    """A mixture of experts: its router's auxiliary (load-balancing) loss is off in every model this tool builds
    (`output_router_logits` False: the student is trained on the recipe's terms alone)."""

    def fit_config(self, config, layers: Sequence[nn.Module]) -> None:
        """Set `config`'s per-layer fields for a model running `layers` in order (in place)."""
        if self.layer_config is not None:
            for name, value in self.layer_config(layers).items():
                setattr(config, name, value)
        if self.moe and hasattr(config, "output_router_logits"):
            config.output_router_logits = False

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


def _sparse_layers(layers: Sequence[nn.Module]) -> dict:
    """Qwen-MoE: which layers have a dense MLP, by what each layer holds (a sparse block has experts)."""
    dense = [i for i, layer in enumerate(layers) if not hasattr(layer.mlp, "experts")]
    return {"mlp_only_layers": dense, "decoder_sparse_step": 1}


def _rope_layers(layers: Sequence[nn.Module]) -> dict:
    """SmolLM3: which layers use rotary position embeddings (the others none: NoPE), by what each layer does."""
    return {"no_rope_layers": [int(bool(layer.get_submodule("self_attn").use_rope)) for layer in layers]}


ARCHES: tuple[Arch, ...] = (
    Arch("Llama (incl. SmolLM2, Llama 3)", ("llama",), **_LLAMA_LIKE),
    Arch("Mistral", ("mistral",), **_LLAMA_LIKE),
    Arch("Qwen2", ("qwen2",), **_LLAMA_LIKE),
    Arch("Qwen3", ("qwen3",), **_LLAMA_LIKE),
    Arch("Gemma 2", ("gemma2",), **_LLAMA_LIKE),
    Arch("Gemma 3 (text)", ("gemma3_text",), **_LLAMA_LIKE),
    Arch("Phi-3", ("phi3",), **_LLAMA_LIKE),
    Arch("SmolLM3", ("smollm3",), **_LLAMA_LIKE, layer_config=_rope_layers),
    Arch("Mixtral (mixture of experts)", ("mixtral",), **_LLAMA_LIKE, moe=True),
    Arch("OLMoE (mixture of experts)", ("olmoe",), **_LLAMA_LIKE, moe=True),
    Arch("Qwen3-MoE, Qwen2-MoE (mixtures of experts)", ("qwen3_moe", "qwen2_moe"), **_LLAMA_LIKE,
         layer_config=_sparse_layers, moe=True),
    Arch(
        "GPT-NeoX (Pythia)", ("gpt_neox",),
        base="gpt_neox", layers="layers", embeddings=("embed_in",), norm="final_layer_norm", head="lm_head",
    ),
    Arch("GPT-2", ("gpt2",), base="transformer", layers="h", embeddings=("wte", "wpe"), norm="ln_f", head="lm_head"),
)


def intermediate_size(config) -> int:
    """The width of a layer's MLP (GPT-2 calls it `n_inner`, and leaves it unset for 4 x hidden)."""
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size


def active_intermediate_size(config) -> int:
    """The MLP width a token passes through: a mixture of experts' `num_experts_per_tok` experts of
    `moe_intermediate_size` (and its shared expert, if any); a dense model's `intermediate_size`."""
    k = getattr(config, "num_experts_per_tok", None)
    if not k:
        return intermediate_size(config)
    expert = getattr(config, "moe_intermediate_size", None) or intermediate_size(config)
    return k * expert + (getattr(config, "shared_expert_intermediate_size", None) or 0)


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
