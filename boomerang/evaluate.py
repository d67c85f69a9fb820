"""Label-free measures of every size of a family: held-out perplexity, KL to the teacher, top-1 agreement.

They need no labels and say how close each size stays to its teacher. (lm-eval tasks, cost and
baselines build on this; see the evaluation issue.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from boomerang.family import Family


@dataclass
class LabelFree:
    """Label-free metrics of one model on held-out token blocks."""

    n_layers: int
    perplexity: float
    """exp(mean next-token cross-entropy)."""
    kl_to_teacher: float
    """Mean over positions of KL(teacher || model), in nats."""
    top1_agreement: float
    """Fraction of positions where the model's most likely next token is the teacher's."""
    tokens: int
    """Predicted positions measured."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def label_free(model, teacher, blocks: torch.Tensor, *, batch_size: int = 8, n_layers: int = 0) -> LabelFree:
    """Metrics of `model` on `blocks` (N, T) against `teacher`."""
    nll = kl = agree = count = 0.0
    device = next(model.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)  # (B, T)
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)  # (B, T-1, V)
        t_logp = logp if model is teacher else torch.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
        target = ids[:, 1:]
        nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        kl += (t_logp.exp() * (t_logp - logp)).sum().item()
        agree += (logp.argmax(-1) == t_logp.argmax(-1)).sum().item()
        count += target.numel()
    return LabelFree(n_layers, math.exp(nll / count), kl / count, agree / count, int(count))


def family_label_free(family: Family, blocks: torch.Tensor, *, batch_size: int = 8, on_size=None) -> list[LabelFree]:
    """Label-free metrics of every size, smallest first."""
    out = []
    for n in family.layer_counts:
        result = label_free(family.build(n), family.teacher, blocks, batch_size=batch_size, n_layers=n)
        out.append(result)
        if on_size:
            on_size(result)
    return out
