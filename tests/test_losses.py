"""The losses by their properties."""

import pytest
import torch
import torch.nn.functional as F

from boomerang.training.losses import cosine_alignment, kl_to_teacher, next_token_cross_entropy


def logits(seed=0, shape=(2, 6, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_kl_of_identical_logits_is_zero_and_positive_otherwise():
    a, mask = logits(), torch.ones(2, 6)
    assert kl_to_teacher(a, a.clone(), mask).item() == pytest.approx(0, abs=1e-6)
    assert kl_to_teacher(logits(1), a, mask).item() > 0.1


def test_kl_matches_torch_reference():
    s, t, mask = logits(0), logits(1), torch.ones(2, 6)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(kl_to_teacher(s, t, mask), ref)
    # temperature: computed on softened distributions, scaled by T^2
    ref2 = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1).mean() * 4
    torch.testing.assert_close(kl_to_teacher(s, t, mask, temperature=2.0), ref2)


def test_cosine_of_identical_states_is_zero_and_scale_free():
    h, mask = logits(shape=(2, 6, 8)), torch.ones(2, 6)
    assert cosine_alignment([h, h], [h.clone(), 3 * h], mask).item() == pytest.approx(0, abs=1e-6)
    assert cosine_alignment([h], [-h], mask).item() == pytest.approx(2.0, abs=1e-5)


def test_cross_entropy_matches_reference_and_masks_padding():
    lg, ids = logits(), torch.randint(0, 11, (2, 6))
    mask = torch.ones(2, 6)
    ref = F.cross_entropy(lg[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_cross_entropy(lg, ids, mask), ref)
    # padded positions change nothing, whatever their logits
    mask[1, 3:] = 0
    lg2 = lg.clone()
    lg2[1, 3:] = 1e4 * torch.randn(3, 11)
    ids2 = ids.clone()
    ids2[1, 4:] = 0
    torch.testing.assert_close(next_token_cross_entropy(lg, ids, mask), next_token_cross_entropy(lg2, ids2, mask))
    torch.testing.assert_close(kl_to_teacher(lg, logits(3), mask), kl_to_teacher(lg2, logits(3), mask))


def test_no_valid_token_gives_zero_not_nan():
    lg, mask = logits(), torch.zeros(2, 6)
    for value in (next_token_cross_entropy(lg, torch.zeros(2, 6, dtype=torch.long), mask),
                  kl_to_teacher(lg, logits(1), mask), cosine_alignment([lg], [logits(1)], mask)):
        assert value.item() == 0


def test_gradients_flow_to_the_student_only():
    s = logits(0).requires_grad_()
    t = logits(1).requires_grad_()
    hs, ht = logits(2, (2, 6, 8)).requires_grad_(), logits(3, (2, 6, 8)).requires_grad_()
    mask = torch.ones(2, 6)
    # the training loop computes the teacher's side under no_grad; the losses must not need more
    with torch.no_grad():
        t_detached, ht_detached = t * 1, ht * 1
    loss = kl_to_teacher(s, t_detached, mask) + cosine_alignment([hs], [ht_detached], mask)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and hs.grad.abs().sum() > 0
    assert t.grad is None and ht.grad is None


def test_relative_mse_is_zero_for_identical_states_and_sees_norms():
    from boomerang.training.losses import relative_mse

    h, mask = logits(shape=(2, 6, 8)), torch.ones(2, 6)
    assert relative_mse([h], [h.clone()], mask).item() == pytest.approx(0, abs=1e-7)
    # the cosine loss cannot tell 3h from h; the relative MSE can: ||3h - h||^2 / ||h||^2 = 4
    assert cosine_alignment([3 * h], [h], mask).item() == pytest.approx(0, abs=1e-6)
    assert relative_mse([3 * h], [h], mask).item() == pytest.approx(4.0, rel=1e-5)
    # the mean of a batch's halves is the batch's value (a batch split over processes gives the same loss)
    s = h + 0.3 * logits(seed=1, shape=(2, 6, 8))
    halves = [relative_mse([s[i:i + 1]], [h[i:i + 1]], mask[i:i + 1]) for i in (0, 1)]
    assert relative_mse([s], [h], mask).item() == pytest.approx(sum(halves).item() / 2, rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_losses_equal_the_whole_batch_and_their_gradients(chunk):
    """Chunks of positions, each recomputed in the backward pass: the same losses and gradients (padding too)."""
    torch.manual_seed(0)
    s = torch.randn(3, 17, 151, requires_grad=True)
    t = torch.randn(3, 17, 151)
    ids = torch.randint(0, 151, (3, 17))
    mask = torch.ones(3, 17)
    mask[1, 12:] = 0
    whole = next_token_cross_entropy(s, ids, mask) + 0.1 * kl_to_teacher(s, t, mask, 2.0)
    (g_whole,) = torch.autograd.grad(whole, s)
    parts = next_token_cross_entropy(s, ids, mask, chunk) + 0.1 * kl_to_teacher(s, t, mask, 2.0, chunk)
    (g_parts,) = torch.autograd.grad(parts, s)
    assert abs(float(whole.detach()) - float(parts.detach())) < 1e-5
    torch.testing.assert_close(g_parts, g_whole, rtol=0, atol=1e-6)
