"""How much each teacher layer matters, and the teacher with layers dropped (shared weights).

Used by training (the importance plan) and by evaluation, whose baselines are built on the same footing:

- `undistilled`: the freshly cut student, patched the same way. Its layers are the teacher's own, so
  its size with n layers is also plain layer dropping of the teacher *by the same plan* (the layers
  of the unpatched spans beyond the first are dropped): one series serves both.
- `drop-bi`: the teacher with the layers of lowest block influence dropped (Men et al., 2024,
  "ShortGPT"): a layer whose output is most like its input (cosine) goes first.
"""

from __future__ import annotations

import torch

from boomerang.arch import adapter_for
from boomerang.family import assemble, layer_types_of, mean_kl


@torch.no_grad()
def block_influence(teacher, ids: torch.Tensor) -> list[float]:
    """Per teacher layer, 1 - mean cosine(input, output) over tokens of `ids` (B, T)."""
    arch = adapter_for(teacher)
    layers = arch.layer_list(teacher)
    inputs, outputs, handles = {}, {}, []
    for i, layer in enumerate(layers):
        def pre(module, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, kwargs, output, i=i):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        teacher(ids)
    finally:
        for h in handles:
            h.remove()
    cos = [torch.nn.functional.cosine_similarity(inputs[i].float(), outputs[i].float(), dim=-1).mean().item()
           for i in range(len(layers))]
    return [1 - c for c in cos]


@torch.no_grad()
def drop_one_costs(teacher, ids: torch.Tensor, on_layer=None) -> list[float]:
    """Per teacher layer, KL(teacher || teacher without that one layer) on `ids` (B, T), mean per token.

    The direct measure of what a plan asks a student layer to make up for when it drops the layer.
    """
    reference = teacher(ids, use_cache=False).logits
    costs = []
    for i in range(teacher.config.num_hidden_layers):
        costs.append(mean_kl(reference, dropped_teacher(teacher, [i])(ids, use_cache=False).logits))
        if on_layer:
            on_layer()
    return costs


def drop_order(influence: list[float]) -> list[int]:
    """Teacher layers in the order they are dropped: least influence first."""
    return sorted(range(len(influence)), key=lambda i: influence[i])


def dropped_teacher(teacher, drop: list[int]):
    """The teacher without the given layers, sharing every weight."""
    arch = adapter_for(teacher)
    keep = [i for i in range(teacher.config.num_hidden_layers) if i not in set(drop)]
    types = layer_types_of(teacher)
    return assemble(teacher, [arch.layer_list(teacher)[i] for i in keep], [types[i] for i in keep] if types else None)
