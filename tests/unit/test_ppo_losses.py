"""PPO's clipped value loss, whitening and the clipped surrogate with per-token advantages, with
numbers worked by hand and their gradients."""

import math

import pytest
import torch

from grpokit.algos import clipped_value_loss, explained_variance, masked_whiten, policy_loss


def test_clipped_value_loss_worked_numbers_and_gradients():
    # V_old = 0.5, return R = 1.0, cliprange_value c = 0.2, so the clipped prediction stays in [0.3, 0.7].
    # a) V = 0.9 (moved +0.4): unclipped (0.9 - 1)^2 = 0.01, clipped (0.7 - 1)^2 = 0.09 -> max 0.09,
    #    loss 0.5 * 0.09 = 0.045, clipped branch wins -> gradient 0 (no profit from the big move)
    # b) V = 0.6 (inside the range): both (0.6 - 1)^2 = 0.16 -> loss 0.08, gradient V - R = -0.4
    # c) V = 0.1 (moved -0.4, away from R): unclipped 0.81 > clipped (0.3 - 1)^2 = 0.49 -> loss 0.405,
    #    the unclipped branch wins, so the gradient V - R = -0.9 stays (clipping is pessimistic only)
    values = torch.tensor([[0.9, 0.6, 0.1]], requires_grad=True)
    old, ret = torch.full((1, 3), 0.5), torch.full((1, 3), 1.0)
    loss, clipped = clipped_value_loss(values, old, ret, cliprange_value=0.2)
    assert torch.allclose(loss, torch.tensor([[0.045, 0.08, 0.405]]))
    assert clipped.tolist() == [[True, False, False]]
    loss.sum().backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.4, -0.9]]))


def test_clipped_value_loss_without_room_to_clip_is_half_the_squared_error():
    values = torch.randn(3, 4)
    old = values + 0.01
    ret = torch.randn(3, 4)
    loss, _ = clipped_value_loss(values, old, ret, cliprange_value=1.0)
    assert torch.allclose(loss, 0.5 * (values - ret) ** 2)


def test_whiten_worked_numbers():
    # active entries 1, 2, 3, 4: mean 2.5, unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3,
    # std = 1.290994 -> (x - 2.5) / 1.290994 = [-1.161895, -0.387298, 0.387298, 1.161895]
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = masked_whiten(values, mask)
    expected = torch.tensor([[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-6)
    # shift_mean=False only rescales: the mean 2.5 is added back
    kept = masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(kept, torch.where(mask.bool(), expected + 2.5, 0.0), atol=1e-6)


def test_whiten_gives_mean_0_and_unbiased_std_1_on_the_active_entries():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(6, 9, generator=g) < 0.6
    out = masked_whiten(values, mask)[mask]
    assert abs(float(out.mean())) < 1e-9
    assert abs(float(out.std()) - 1) < 1e-6
    assert torch.equal(masked_whiten(values, mask)[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))


def test_ppo_surrogate_with_per_token_advantages():
    # token 0: ratio e^0.3 = 1.3499, A = +1 -> clipped to 1.2 -> l = -1.2, no gradient
    # token 1: ratio e^-0.3 = 0.7408, A = +2 -> min(0.7408 * 2, 0.8 * 2) = 1.4816 -> l = -1.4816,
    #          gradient -A * ratio = -1.4816
    # token 2: padding. bnpo = token mean over the 2 active tokens: (-1.2 - 1.4816) / 2 = -1.3408
    old = torch.zeros(1, 3)
    logps = torch.tensor([[0.3, -0.3, 5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logps, old, adv, mask, loss_type="bnpo", epsilon=0.2)
    assert float(loss.detach()) == pytest.approx((-1.2 - 2 * math.exp(-0.3)) / 2, abs=1e-6)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.0, -math.exp(-0.3) * 2 / 2, 0.0]]), atol=1e-6)
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(0.5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert float(explained_variance(ret, ret, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full((1, 4), 7.0), ret, mask)) == pytest.approx(0.0)
    # V = R - [1, -1, 1, -1]: Var[R] = 1.25 (R = 1..4, mean 2.5), Var[R - V] = 1.0 -> 1 - 1/1.25 = 0.2
    v = ret - torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert float(explained_variance(v, ret, mask)) == pytest.approx(0.2)
