"""GAE and the per-token PPO rewards, against numbers worked by hand and against the explicit sum
A_t = sum_l (gamma * lam)^l * delta_{t+l}."""

import pytest
import torch

from grpokit.algos import gae_advantages, ppo_token_rewards


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_three_tokens_gamma_1_lambda_095():
    # r = [0, 0, 1] (the score on the last token), V = [0.5, 0.6, 0.8], gamma = 1, lambda = 0.95:
    # delta_2 = 1 + 0 - 0.8 = 0.2         (no value after the last token)
    # delta_1 = 0 + 0.8 - 0.6 = 0.2
    # delta_0 = 0 + 0.6 - 0.5 = 0.1
    # A_2 = 0.2
    # A_1 = 0.2 + 0.95 * 0.2  = 0.39
    # A_0 = 0.1 + 0.95 * 0.39 = 0.4705
    # returns R = A + V = [0.9705, 0.99, 1.0]
    adv, ret = gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.8]]), t([[1, 1, 1]]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, t([[0.4705, 0.39, 0.2]]))
    assert torch.allclose(ret, t([[0.9705, 0.99, 1.0]]))


def test_gae_discounted_monte_carlo_when_lambda_is_1():
    # gamma = 0.9, lambda = 1: A_t = discounted return - V_t; returns G = [0.81, 0.9, 1.0]
    # delta_2 = 1 - 0.8 = 0.2; delta_1 = 0.9 * 0.8 - 0.6 = 0.12; delta_0 = 0.9 * 0.6 - 0.5 = 0.04
    # A_2 = 0.2; A_1 = 0.12 + 0.9 * 0.2 = 0.3; A_0 = 0.04 + 0.9 * 0.3 = 0.31 (= 0.81 - 0.5)
    adv, ret = gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.8]]), t([[1, 1, 1]]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, t([[0.31, 0.3, 0.2]]))
    assert torch.allclose(ret, t([[0.81, 0.9, 1.0]]))


def test_gae_lambda_0_is_the_one_step_td_error():
    adv, _ = gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.8]]), t([[1, 1, 1]]), gamma=0.9, lam=0.0)
    assert torch.allclose(adv, t([[0.04, 0.12, 0.2]]))


def test_gae_ignores_whatever_the_padding_holds():
    # row of 2 tokens, padding filled with garbage: r = [0.5, -1, 99], V = [0.2, 0.4, 77]
    # delta_1 = -1 + 0 - 0.4 = -1.4 (the episode ends: V_2 does not count); A_1 = -1.4
    # delta_0 = 0.5 + 0.4 - 0.2 = 0.7; A_0 = 0.7 + 0.95 * (-1.4) = -0.63
    # R = [-0.43, -1.0, 0]
    adv, ret = gae_advantages(t([[0.5, -1.0, 99.0]]), t([[0.2, 0.4, 77.0]]), t([[1, 1, 0]]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, t([[-0.63, -1.4, 0.0]]))
    assert torch.allclose(ret, t([[-0.43, -1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_recursion_equals_the_explicit_sum(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, steps = 5, 7
    rewards, values = torch.randn(b, steps, generator=g, dtype=torch.float64), torch.randn(b, steps, generator=g,
                                                                                           dtype=torch.float64)
    lengths = [7, 1, 4, 0, 6]
    mask = torch.zeros(b, steps, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.zeros(b, steps, dtype=torch.float64)
    for i, n in enumerate(lengths):
        delta = [rewards[i, k] + (gamma * values[i, k + 1] if k + 1 < n else 0.0) - values[i, k] for k in range(n)]
        for k in range(n):
            expected[i, k] = sum((gamma * lam) ** j * delta[k + j] for j in range(n - k))
    assert torch.allclose(adv, expected)
    assert torch.allclose(ret, (expected + values) * mask)


def test_gae_does_not_backpropagate_into_the_values():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    adv, ret = gae_advantages(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2), gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_token_rewards_kl_on_every_token_score_on_the_last():
    # kl_coef = 0.5; row 0 (3 tokens): [-0.05, -0.1, -0.15 + 1.0]; row 1 (2 tokens): [-0.2, 0.1 + 0.5, 0]
    # row 2 has no token: its score has nowhere to go
    scores = t([1.0, 0.5, 7.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0], [1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards = ppo_token_rewards(scores, kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, t([[-0.05, -0.1, 0.85], [-0.2, 0.6, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(ppo_token_rewards(scores, kl, mask, kl_coef=0.0)[:2].sum(-1), scores[:2])


def test_shape_errors_name_the_tensors():
    with pytest.raises(ValueError, match="rewards"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="scores"):
        ppo_token_rewards(torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3), kl_coef=0.1)
