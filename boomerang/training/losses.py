"""The distillation losses as pure tensor functions.

Shapes: B batch, T positions, V vocabulary, D hidden size. `mask` is (B, T) with 1 for real tokens
and 0 for padding; every loss is a mean over valid positions, guarded so that a batch with no valid
token gives 0 rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (B, T) over positions where `mask` (B, T) is 1."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _chunked_masked_mean(per_position, tensors: tuple[torch.Tensor, ...], mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """`_masked_mean(per_position(*tensors), mask)`, computed `chunk` positions at a time when `chunk` > 0.

    Each chunk runs under activation checkpointing: its (chunk x V) float32 intermediates are freed after
    the forward and recomputed in the backward, so no (B x T x V) float32 copy exists beyond the logits
    themselves and their gradient. The same value (to float rounding) as the unchunked mean."""
    if chunk <= 0 or chunk >= mask.shape[1]:
        return _masked_mean(per_position(*tensors), mask)
    m = mask.to(torch.float32)
    total = m.new_zeros(())
    for start in range(0, mask.shape[1], chunk):
        parts = tuple(x[:, start:start + chunk] for x in tensors)
        values = checkpoint(per_position, *parts, use_reentrant=False) if torch.is_grad_enabled() else per_position(*parts)
        total = total + (values * m[:, start:start + chunk]).sum()
    return total / m.sum().clamp_min(1)


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                             chunk: int = 0) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t.

    logits (B, T, V), input_ids (B, T), mask (B, T). A position counts when both it and the next
    token are valid. `chunk` > 0: computed that many positions at a time (see `_chunked_masked_mean`).
    """
    def per_position(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred.float().transpose(1, 2), target, reduction="none")  # (B, t)

    valid = mask[:, :-1] * mask[:, 1:]  # (B, T-1)
    return _chunked_masked_mean(per_position, (logits[:, :-1], input_ids[:, 1:]), valid, chunk)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0, chunk: int = 0) -> torch.Tensor:
    """KL(teacher || student) per position on temperature-softened distributions, times T^2.

    student_logits, teacher_logits (B, T, V); mask (B, T). The T^2 factor keeps gradient scale
    independent of the temperature (Hinton et al., 2015). `chunk` > 0: computed that many positions at a
    time (see `_chunked_masked_mean`).
    """
    def per_position(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        t = F.log_softmax(t_logits.float() / temperature, dim=-1)  # (B, t, V)
        s = F.log_softmax(s_logits.float() / temperature, dim=-1)  # (B, t, V)
        return (t.exp() * (t - s)).sum(-1)  # (B, t)

    return _chunked_masked_mean(per_position, (student_logits, teacher_logits), mask, chunk) * temperature**2


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
