"""What models of one family compute in common: a model as a path of steps (its embeddings and settings, then its
layers by their weights), so that two models share the hidden states after k layers exactly when their paths agree
that far; and `Replay`, a stand-in layer that hands on a state computed elsewhere."""

from __future__ import annotations

import json

from torch import nn

from boomerang.arch import CausalLM, adapter_for

_NOT_MODEL_LEVEL = {"num_hidden_layers", "tie_word_embeddings", "_name_or_path", "name_or_path", "architectures",
                    "transformers_version", "dtype", "torch_dtype", "output_router_logits", "_commit_hash"}
"""Config fields that do not change what the shared part of a forward pass computes (the layer count, naming, tying:
the head is not shared)."""


def model_path(model: CausalLM) -> list:
    """What `model` computes before its final norm, as a list of hashable steps: the embeddings with every
    model-level setting (rotary embeddings, attention implementation, dtype, device), then one step per layer (its
    weights and the per-layer config entries at its position). Two models compute the same hidden states after k
    layers exactly when the first k + 1 steps of their paths are equal."""
    arch = adapter_for(model)
    base = arch.base_model(model)
    config = model.config
    layers = list(arch.layer_list(model))
    per_layer = {k: v for k, v in sorted(vars(config).items()) if isinstance(v, (list, tuple)) and len(v) == len(layers)}
    # fields the layers decided at construction (`Arch.layer_config`: rewritten for every cut) are in the layers
    built_in = set(arch.layer_config(layers)) if arch.layer_config else set()
    level = {k: v for k, v in config.to_dict().items() if k not in _NOT_MODEL_LEVEL | built_in and k not in per_layer}
    level["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    weight = arch.token_embedding(model).weight
    embeddings = tuple(module_ids(getattr(base, name)) for name in arch.embeddings)
    root = (type(model).__name__, embeddings, str(weight.dtype), str(weight.device),
            json.dumps(level, sort_keys=True, default=str))
    return [root] + [(module_ids(layer), tuple(str(v[i]) for v in per_layer.values())) for i, layer in enumerate(layers)]


def module_ids(module: nn.Module) -> tuple[int, ...]:
    """The identity of a module's weights: the ids of its parameters and buffers."""
    return tuple(id(t) for t in (*module.parameters(), *module.buffers()))


class Replay(nn.Module):
    """Stands for the first layers of a model: hands on the state they would have computed."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def forward(self, *args, **kwargs):
        return self.state


def run_with_layers(model: CausalLM, layers: list, **inputs):
    """`model(**inputs)` with its layer list swapped for `layers` for the length of the call (its own restored after,
    also when the call raises)."""
    arch = adapter_for(model)
    base = arch.base_model(model)
    own = arch.layer_list(model)
    base._modules[arch.layers] = nn.ModuleList(layers)
    try:
        return model(**inputs)
    finally:
        base._modules[arch.layers] = own
