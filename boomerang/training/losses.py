"""The distillation losses as pure tensor functions.

Shapes: B batch, T positions, V vocabulary, D hidden size. `mask` is (B, T) with 1 for real tokens
and 0 for padding; every loss is a mean over valid positions, guarded so that a batch with no valid
token gives 0 rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (B, T) over positions where `mask` (B, T) is 1."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t.

    logits (B, T, V), input_ids (B, T), mask (B, T). A position counts when both it and the next
    token are valid.
    """
    pred = logits[:, :-1].float()  # (B, T-1, V)
    target = input_ids[:, 1:]  # (B, T-1)
    valid = mask[:, :-1] * mask[:, 1:]  # (B, T-1)
    ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, T-1)
    return _masked_mean(ce, valid)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position on temperature-softened distributions, times T^2.

    student_logits, teacher_logits (B, T, V); mask (B, T). The T^2 factor keeps gradient scale
    independent of the temperature (Hinton et al., 2015).
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return _masked_mean(kl, mask) * temperature**2


def cosine_alignment(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                     mask: torch.Tensor) -> torch.Tensor:
    """Sum over aligned pairs of the mean (1 - cosine similarity) between hidden states.

    Each state (B, T, D); mask (B, T). The caller scales the sum (the paper: 2.0 / number of pairs).
    """
    if len(student_states) != len(teacher_states):
        raise ValueError(f"{len(student_states)} student states but {len(teacher_states)} teacher states")
    total = mask.new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states, strict=False):
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-8)  # (B, T)
        total = total + _masked_mean(1 - cos, mask)
    return total


def relative_mse(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                 mask: torch.Tensor) -> torch.Tensor:
    """Sum over aligned pairs of the mean over positions of ||s - t||^2 / ||t||^2.

    Each state (B, T, D); mask (B, T). Matches norms as well as directions. Dividing each position
    by its own teacher norm makes every layer and every token count alike (an attention-sink token
    with a huge residual stream does not drown the rest), and keeps the loss of a batch the mean
    of the losses of its parts, so splitting a batch over processes changes nothing.
    """
    if len(student_states) != len(teacher_states):
        raise ValueError(f"{len(student_states)} student states but {len(teacher_states)} teacher states")
    total = mask.new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states, strict=False):
        err = (s.float() - t.float()).pow(2).sum(-1)  # (B, T)
        scale = t.float().pow(2).sum(-1).detach().clamp_min(1e-8)  # (B, T)
        total = total + _masked_mean(err / scale, mask)
    return total
