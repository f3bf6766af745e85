"""TRL 1.16's objective knobs, by hand: the bias-corrected KL, cispo's cap, GSPO with the entropy
mask, luspo, vespo, the off-policy sequence mask, the entropy bonus, GDPO's normalize_then_sum and
the all-rank batch std (two simulated ranks against one)."""

import math

import pytest
import torch

from grpokit.algos import (batch_normalized, entropy_bonus, group_advantages, normalize_then_sum, policy_loss,
                           top_entropy_mask)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# --- the bias-corrected KL (use_bias_correction_kl, TRL's default) ------------------------------

def test_bias_corrected_kl_by_hand():
    # one token: logp = -1, old = -1.5 (r = e^0.5 = 1.648721), ref = -1.2, A = 0 (no policy term),
    # beta = 0.1, k3: d = ref - logp = -0.2, KL = e^d - d - 1 = 0.8187308 + 0.2 - 1 = 0.0187308.
    # corrected: KL * r = 0.0308822, loss = beta * that = 0.00308822 (dapo over one token).
    # d/dlogp (KL * r) = dKL * r + KL * r (dr/dlogp = r) = r * (1 - e^d + KL) = r * (-d) = 0.3297443,
    # times beta: 0.03297443. Uncorrected: beta * (1 - e^d) = 0.01812692.
    r, d = math.exp(0.5), -0.2
    kl = math.exp(d) - d - 1
    for corrected, want_loss, want_grad in ((True, 0.1 * kl * r, 0.1 * r * -d), (False, 0.1 * kl, 0.1 * (1 - math.exp(d)))):
        logp = torch.tensor([[-1.0]], requires_grad=True)
        loss, stats = policy_loss(logp, torch.tensor([[-1.5]]), torch.tensor([0.0]), torch.ones(1, 1),
                                  ref_logps=torch.tensor([[-1.2]]), beta=0.1, use_bias_correction_kl=corrected)
        assert loss.item() == pytest.approx(want_loss, rel=1e-5)
        assert grad_of(loss, logp).item() == pytest.approx(want_grad, rel=1e-5)
        assert stats["kl"].item() == pytest.approx(kl * (r if corrected else 1.0), rel=1e-5)  # TRL logs the corrected one
    assert 0.1 * r * -d == pytest.approx(0.03297443, rel=1e-6)


def test_bias_corrected_kl_on_policy_is_the_plain_kl_in_value_but_not_in_gradient():
    # on-policy r = 1 with gradient dlogp: value KL, gradient dKL + KL (TRL's, since coef_1 keeps its grad)
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, None, torch.tensor([0.0]), torch.ones(1, 1), ref_logps=torch.tensor([[-1.2]]),
                          beta=1.0, use_bias_correction_kl=True)
    kl = math.exp(-0.2) + 0.2 - 1
    assert loss.item() == pytest.approx(kl, rel=1e-5)
    assert grad_of(loss, logp).item() == pytest.approx((1 - math.exp(-0.2)) + kl, rel=1e-5)  # = 0.2


# --- cispo's cap -------------------------------------------------------------------------------

def test_cispo_cap_is_epsilon_when_epsilon_high_is_unset_as_in_trl():
    # r = e^0.5 = 1.6487, A = 1, logp = -2: cap epsilon = 0.3 -> w = 0.3, loss = -0.3 * 1 * -2 = 0.6
    logp = torch.tensor([[-2.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor([[-2.5]]), torch.tensor([1.0]), torch.ones(1, 1),
                              loss_type="cispo", epsilon=0.3)
    assert loss.item() == pytest.approx(0.6, rel=1e-6)
    assert grad_of(loss, logp).item() == pytest.approx(-0.3, rel=1e-6)
    assert stats["clip_ratio/high_mean"].item() == 1.0


# --- GSPO with the entropy mask ---------------------------------------------------------------

def test_gspo_with_the_entropy_mask_scales_the_sequence_as_trl():
    # one sequence of 2 tokens: logp = [-1, -2], old = [-1.2, -2.4]: log ratios [0.2, 0.4], mean 0.3,
    # s = e^0.3 = 1.3498588. A = -1, epsilon 0.2: s > 1.2, and for A < 0 the unclipped branch is
    # the max loss: l = s per token. The entropy mask keeps token 0 only; grpo: (s * 1) / |o| = 2
    # -> loss s / 2 = 0.6749294. TRL's coef_1 carries the gradient of the sequence mean, so
    # d loss / d logp_t = (1/2) * s * (1/2) = 0.3374647 for BOTH tokens (the kept token's value
    # depends on every token's logp); masking a token scales the sequence's loss, it does not cut
    # that token's gradient.
    s = math.exp(0.3)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.2, -2.4]]), torch.tensor([-1.0]), torch.ones(1, 2),
                          loss_type="grpo", importance_sampling_level="sequence",
                          entropy_mask=torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(s / 2, rel=1e-6)
    torch.testing.assert_close(grad_of(loss, logp), torch.full((1, 2), s / 4))


def test_gspo_without_a_mask_has_gspo_gradient():
    # unmasked: d/dlogp_t of mean_t(s) = s / |o| for each token (A = -1, loss = s): [s/2, s/2]
    s = math.exp(0.3)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.2, -2.4]]), torch.tensor([-1.0]), torch.ones(1, 2),
                          loss_type="grpo", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(s, rel=1e-6)
    torch.testing.assert_close(grad_of(loss, logp), torch.full((1, 2), s / 2))


# --- luspo and vespo --------------------------------------------------------------------------

def test_luspo_is_the_mean_of_sequence_sums():
    # on-policy, A = [1, -1]; row 0 has 3 tokens, row 1 has 1: per-token loss -A, sums [-3, +1],
    # mean -1; gradient -A / 2 per active token (mean over the 2 rows), 0 on padding.
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    loss, _ = policy_loss(logp, None, torch.tensor([1.0, -1.0]), mask, loss_type="luspo")
    assert loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(grad_of(loss, logp), torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.0, 0.0]]))


def test_vespo_gamma_weight_by_hand():
    # 2 tokens, log ratios [0.1, 0.2]: the SUM 0.3 -> w = e^0.3 = 1.3498588. A = 1 -> k = 2,
    # lambda = 3: log phi = 3 + 2 * 0.3 - 3 * 1.3498588 = -0.4495764, phi = 0.6378983.
    # l_t = -phi * A * logp_t with logp = [-1, -2]: [0.6379, 1.2758]; dapo / 2 tokens = 0.9568474;
    # gradient -phi / 2 = -0.3189491 per token (phi is not differentiated).
    w = math.exp(0.3)
    phi = math.exp(3 + 2 * 0.3 - 3 * w)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor([[-1.1, -2.2]]), torch.tensor([1.0]), torch.ones(1, 2),
                              loss_type="vespo")
    assert phi == pytest.approx(0.6378983, rel=1e-6)
    assert loss.item() == pytest.approx(phi * 3 / 2, rel=1e-5)
    torch.testing.assert_close(grad_of(loss, logp), torch.full((1, 2), -phi / 2))
    assert stats["vespo/phi_seq_mean"].item() == pytest.approx(phi, rel=1e-5)


def test_vespo_takes_the_sampler_weights_into_phi_not_as_a_factor():
    # is_weights [0.5, 1]: log w = 0.3 + log 0.5 = -0.3931472, w = 0.6749294; A = -1 -> k = 3,
    # lambda = 2: log phi = 2 + 3 * (-0.3931) - 2 * 0.6749 = -0.5293. The loss is -phi*A*logp
    # summed / 2, with no further product by is_weights.
    log_w = 0.3 + math.log(0.5)
    phi = math.exp(2 + 3 * log_w - 2 * math.exp(log_w))
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.1, -2.2]]), torch.tensor([-1.0]), torch.ones(1, 2),
                          loss_type="vespo", is_weights=torch.tensor([[0.5, 1.0]]))
    assert loss.item() == pytest.approx(-phi * 3 / 2, rel=1e-5)


# --- the off-policy sequence mask --------------------------------------------------------------

def test_off_policy_mask_drops_negative_sequences_that_drifted():
    # rows: A = [-1, -1, +1]; the behaviour policy (old) is above the current policy by a mean of
    # [0.5, 0.05, 0.5] nats per token. Threshold 0.1: row 0 (A < 0, drift 0.5) is dropped; row 1
    # (drift 0.05) and row 2 (A >= 0) are kept.
    logp = torch.full((3, 2), -1.0, requires_grad=True)
    old = torch.tensor([[-0.5, -0.5], [-0.95, -0.95], [-0.5, -0.5]])
    adv = torch.tensor([-1.0, -1.0, 1.0])
    loss, stats = policy_loss(logp, old, adv, torch.ones(3, 2), loss_type="bnpo", off_policy_mask_threshold=0.1,
                              epsilon=10.0)  # no clipping: every token's loss is -r * A
    g = grad_of(loss, logp)
    assert torch.all(g[0] == 0) and torch.all(g[1] != 0) and torch.all(g[2] != 0)
    assert stats["off_policy_mask/dropped_ratio"].item() == pytest.approx(1 / 3)
    # the sampler's logprobs (vLLM) are the behaviour policy when given
    loss, _ = policy_loss(logp, old, adv, torch.ones(3, 2), loss_type="bnpo", off_policy_mask_threshold=0.1,
                          epsilon=10.0, sampling_logps=torch.full((3, 2), -1.0))
    assert torch.all(grad_of(loss, logp)[0] != 0)  # no drift from the sampler: kept


# --- the entropy bonus and the all-rank entropy threshold ---------------------------------------

def test_entropy_bonus_is_the_mean_over_the_kept_tokens():
    h = torch.tensor([[0.5, 1.5, 9.0]], requires_grad=True)
    kept = torch.tensor([[True, True, False]])
    bonus = entropy_bonus(h, kept)
    assert bonus.item() == pytest.approx(1.0)
    torch.testing.assert_close(grad_of(bonus, h), torch.tensor([[0.5, 0.5, 0.0]]))


def test_entropy_threshold_over_two_ranks_equals_one_process_with_both_batches():
    torch.manual_seed(0)
    h0, h1 = torch.rand(3, 5), torch.rand(2, 5) * 3
    m0, m1 = torch.ones(3, 5), torch.ones(2, 5)
    m1[1, 3:] = 0
    both = lambda v: torch.cat([h0[m0.bool()], h1[m1.bool()]])  # noqa: E731 - what all-gather returns
    one = top_entropy_mask(torch.cat([h0, h1]), torch.cat([m0, m1]), 0.3)
    ranked = torch.cat([top_entropy_mask(h0, m0, 0.3, gather=both), top_entropy_mask(h1, m1, 0.3, gather=both)])
    assert torch.equal(one, ranked)
    # per rank (no gather) the thresholds differ: rank 0 keeps some of its lower entropies
    assert not torch.equal(one, torch.cat([top_entropy_mask(h0, m0, 0.3), top_entropy_mask(h1, m1, 0.3)]))


# --- advantages: the all-rank batch std and GDPO ------------------------------------------------

def test_batch_std_over_two_ranks_equals_one_process():
    # groups of 2: rank 0 holds [0, 1 | 1, 1], rank 1 [0, 4 | 2, 2]; the global Bessel std of the
    # 8 rewards (mean 1.375) is sqrt(11.875 / 7) = 1.3024702
    r0, r1 = torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 4.0, 2.0, 2.0])
    whole = group_advantages(torch.cat([r0, r1]), 2, scale_rewards="batch")
    every = torch.cat([r0, r1])
    split = torch.cat([group_advantages(r0, 2, scale_rewards="batch", batch_rewards=every),
                       group_advantages(r1, 2, scale_rewards="batch", batch_rewards=every)])
    torch.testing.assert_close(whole, split)
    std = math.sqrt(11.875 / 7)
    assert whole[0].item() == pytest.approx(-0.5 / (std + 1e-4), rel=1e-6)
    # each rank's own std would differ (rank 0: 0.4629, rank 1: 1.4142)
    assert not torch.allclose(whole[:4], group_advantages(r0, 2, scale_rewards="batch"))


def test_normalize_then_sum_by_hand():
    # two reward functions, one group of 2: f1 = [1, 0], f2 = [0, 4], weights [1, 0.5].
    # per function within the group: mean [0.5, 2], Bessel std [0.7071068, 2.8284271];
    # normalised f1 = [+0.70700, -0.70700], f2 = [-0.70708, +0.70708] (each (x - m) / (std + 1e-4));
    # weighted sums s = [0.70700 - 0.35354, -0.70700 + 0.35354] = [0.35346, -0.35346];
    # then over the batch: mean 0, Bessel std 0.49987 -> A = s / (0.49987 + 1e-4) = [0.70697, -0.70697]
    rpf = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    s = normalize_then_sum(rpf, torch.tensor([1.0, 0.5]), 2)
    e1, e2 = 0.5 / (math.sqrt(0.5) + 1e-4), 2 / (math.sqrt(8) + 1e-4)
    torch.testing.assert_close(s, torch.tensor([e1 - 0.5 * e2, -e1 + 0.5 * e2]))
    adv = batch_normalized(s)
    std = math.sqrt(2) * abs(e1 - 0.5 * e2)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]) * abs(e1 - 0.5 * e2) / (std + 1e-4))


def test_normalize_then_sum_skips_none_rewards_and_marks_unscorable_rows():
    nan = float("nan")
    rpf = torch.tensor([[1.0, nan], [0.0, nan], [nan, nan], [nan, nan]])
    s = normalize_then_sum(rpf, torch.ones(2), 2)
    assert s[0] > 0 > s[1] and torch.isnan(s[2:]).all()
    assert torch.equal(batch_normalized(s)[2:], torch.zeros(2))


def test_sampler_correction_bounds_clip_min_and_clip_max():
    from grpokit.algos import rollout_correction_weights

    # rho = exp(trainer - sampler) = [e^-2, 1, e^2] = [0.1353, 1, 7.389]; bounds [0.5, 3]
    trainer = torch.tensor([[-3.0, -1.0, 1.0]])
    sampler = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    truncated = rollout_correction_weights(trainer, sampler, mask, mode="truncate", cap=3.0, floor=0.5)
    torch.testing.assert_close(truncated, torch.tensor([[0.5, 1.0, 3.0]]))
    masked = rollout_correction_weights(trainer, sampler, mask, mode="mask", cap=3.0, floor=0.5)
    torch.testing.assert_close(masked, torch.tensor([[0.0, 1.0, 0.0]]))
    only_floor = rollout_correction_weights(trainer, sampler, mask, mode="mask", cap=None, floor=0.5)
    torch.testing.assert_close(only_floor, torch.tensor([[0.0, 1.0, math.exp(2.0)]]))
