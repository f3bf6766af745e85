"""Policy losses, aggregation and rollout correction, with numbers worked out by hand.

Conventions: r = exp(logp - old), eps = 0.2 (clip to [0.8, 1.2]) unless said, d loss / d logp of a
single-token batch is -A * r on the unclipped branch (dr/dlogp = r) and 0 on the clipped one.
"""

import math

import pytest
import torch

from grpokit.algos import LOSS_TYPES, aggregate_loss, policy_loss, rollout_correction_weights

E = math.exp
CLIP_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def one_token(log_ratio, adv, loss_type="dapo", logp=-1.0, **kwargs):
    """Loss, d loss / d logp and stats of a batch with a single active token."""
    logps = torch.tensor([[logp]], requires_grad=True)
    old = torch.tensor([[logp - log_ratio]])
    kwargs.setdefault("max_completion_length", 1)
    loss, stats = policy_loss(logps, old, torch.tensor([float(adv)]), torch.ones(1, 1), loss_type=loss_type, **kwargs)
    loss.backward()
    return loss.item(), logps.grad.item(), stats


def batch(seed=0, B=4, T=5, off_policy=True):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = (logps.detach() + 0.3 * torch.randn(B, T, generator=g)) if off_policy else None
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    for i, n in enumerate([5, 2, 4, 3][:B]):
        mask[i, n:] = 0
    ref = logps.detach() + 0.2 * torch.randn(B, T, generator=g)
    return logps, old, adv, mask, ref


def loss_and_grad(logps, *args, **kwargs):
    logps.grad = None
    loss, stats = policy_loss(logps, *args, **kwargs)
    loss.backward()
    return loss.detach(), logps.grad.clone(), stats


# --- the clipped surrogate, one token at a time -------------------------------------------------

CLIP_CASES = [
    # (log ratio, A, loss, grad, why)
    (0.1, +1, -E(0.1), -E(0.1), "r = e^0.1 = 1.10517 inside [0.8, 1.2]: loss -r*A"),
    (0.5, +1, -1.2, 0.0, "r = e^0.5 = 1.6487 clipped to 1.2, A = +1: loss -1.2, no gradient"),
    (-0.5, +1, -E(-0.5), -E(-0.5), "r = 0.60653 < 0.8 but A > 0: min picks r*A, unclipped"),
    (-0.5, -1, 0.8, 0.0, "r = 0.60653 clipped up to 0.8, A = -1: loss +0.8, no gradient"),
    (0.1, -1, E(0.1), E(0.1), "A = -1 inside the range: loss +r, gradient +r"),
    (0.5, -1, E(0.5), E(0.5), "A = -1, r = 1.6487 > 1.2: min picks r*A = -1.6487 (unbounded side)"),
]


@pytest.mark.parametrize("loss_type", CLIP_TYPES)
@pytest.mark.parametrize("log_ratio,adv,want_loss,want_grad,why", CLIP_CASES)
def test_clip_losses_by_hand(loss_type, log_ratio, adv, want_loss, want_grad, why):
    # One active token: every aggregation is the identity (dr_grpo with max_completion_length 1).
    loss, grad, _ = one_token(log_ratio, adv, loss_type)
    assert loss == pytest.approx(want_loss, abs=1e-5), why
    assert grad == pytest.approx(want_grad, abs=1e-5), why


def test_clip_higher_epsilon_high():
    # r = e^0.2 = 1.2214: clipped to 1.2 with epsilon_high = epsilon = 0.2, free with 0.28.
    assert one_token(0.2, +1)[0] == pytest.approx(-1.2, abs=1e-6)
    loss, grad, stats = one_token(0.2, +1, epsilon_high=0.28)
    assert (loss, grad) == (pytest.approx(-E(0.2), abs=1e-6), pytest.approx(-E(0.2), abs=1e-6))
    assert stats["clip_ratio/high_mean"].item() == 0.0
    # The low side still uses epsilon: r = e^-0.3 = 0.7408 < 0.8 with A = -1 -> loss 0.8.
    assert one_token(-0.3, -1, epsilon_high=0.28)[:2] == (pytest.approx(0.8), 0.0)


def test_delta_caps_the_unclipped_branch():
    # A = -1, r = e^0.5 = 1.6487: without delta loss +1.6487; delta = 1.5 caps r at 1.5 -> 1.5, grad 0.
    assert one_token(0.5, -1, delta=1.5)[:2] == (pytest.approx(1.5), 0.0)
    # r = e^0.3 = 1.3499 < delta: unchanged (+1.3499, grad +1.3499).
    assert one_token(0.3, -1, delta=1.5)[:2] == (pytest.approx(E(0.3)), pytest.approx(E(0.3)))
    # A = +1: the clipped branch (1.2) is already the smaller, delta changes nothing.
    assert one_token(0.5, +1, delta=1.5)[:2] == (pytest.approx(-1.2), 0.0)


def test_dual_clip_caps_negative_advantages():
    # A = -1, r = 1.6487: loss 1.6487 > dual_clip * |A| = 1.5 -> 1.5, no gradient.
    loss, grad, stats = one_token(0.5, -1, dual_clip=1.5)
    assert (loss, grad) == (pytest.approx(1.5), 0.0)
    assert stats["clip_ratio/dual_mean"].item() == 1.0
    # A = -2, r = 1.1052: loss 2.2103 < 1.5 * 2 = 3: untouched, gradient -A*r = 2.2103.
    assert one_token(0.1, -2, dual_clip=1.5)[:2] == (pytest.approx(2 * E(0.1)), pytest.approx(2 * E(0.1)))
    # A > 0 never dual-clipped: r = 1.6487 -> -1.2 as without it.
    assert one_token(0.5, +1, dual_clip=1.5)[:2] == (pytest.approx(-1.2), 0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        one_token(0.5, -1, dual_clip=0.9)


# --- cispo and sapo ---------------------------------------------------------------------------

CISPO_CASES = [
    # logp = -2, so loss = -w * A * (-2) = 2 w A and grad = -w * A, w = sg[min(r, cap)].
    # epsilon_high unset: the cap is epsilon = 0.2 (TRL: epsilon_high defaults to epsilon), so
    # w = min(1.6487, 0.2) = 0.2: loss 2 * 0.2 = 0.4, grad -0.2, the token counts as capped
    (0.5, +1, None, 0.4, -0.2, 1.0, "epsilon_high unset: the cap is epsilon = 0.2 (TRL)"),
    (0.5, +1, 5.0, 2 * E(0.5), -E(0.5), 0.0, "r = 1.6487 under ScaleRL's cap 5: w = r"),
    (0.5, +1, 1.5, 3.0, -1.5, 1.0, "epsilon_high = 1.5 is the cap (TRL): w = 1.5, gradient kept"),
    (0.5, -1, 1.5, -3.0, 1.5, 0.0, "A = -1: w = 1.5, loss 2*1.5*(-1) = -3, grad +1.5"),
    (-0.5, -1, 1.5, -2 * E(-0.5), E(-0.5), 0.0, "no low clip: w = r = 0.60653"),
]


@pytest.mark.parametrize("log_ratio,adv,cap,want_loss,want_grad,high,why", CISPO_CASES)
def test_cispo_by_hand(log_ratio, adv, cap, want_loss, want_grad, high, why):
    loss, grad, stats = one_token(log_ratio, adv, "cispo", logp=-2.0, epsilon_high=cap)
    assert loss == pytest.approx(want_loss, abs=1e-5), why
    assert grad == pytest.approx(want_grad, abs=1e-5), why
    assert stats["clip_ratio/high_mean"].item() == high


SAPO_CASES = [
    # loss = -sigmoid(tau (r - 1)) * 4 / tau * A, grad = -4 s (1 - s) r A.
    (0.0, +1, -2.0, -1.0, "r = 1, tau_pos = 1: gate 0.5 * 4 = 2, grad -4 * .25 = -1"),
    (0.0, -1, 4 / 1.05 / 2, 1.0, "r = 1, tau_neg = 1.05: gate 2 / 1.05 = 1.90476, grad +1"),
    (0.5, +1, -2.6268890, -1.4867386, "r = 1.6487: s = sigmoid(.64872) = .65672, gate 2.62689"),
    (0.5, -1, 2.5295122, 1.4713518, "r = 1.6487, tau 1.05: s = sigmoid(.68116) = .66400, gate 2.52951"),
]


@pytest.mark.parametrize("log_ratio,adv,want_loss,want_grad,why", SAPO_CASES)
def test_sapo_by_hand(log_ratio, adv, want_loss, want_grad, why):
    loss, grad, stats = one_token(log_ratio, adv, "sapo")
    assert loss == pytest.approx(want_loss, abs=1e-5), why
    assert grad == pytest.approx(want_grad, abs=1e-5), why
    assert "clip_ratio/region_mean" not in stats  # sapo has no hard clip to report


# --- aggregation --------------------------------------------------------------------------------

def test_aggregation_normalisers_by_hand():
    per_token = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])  # NaN sits on padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # grpo: sequence means (1+2)/2 = 1.5 and (4+5+6)/3 = 5, mean 3.25. Active sum 18 over 5 tokens.
    assert aggregate_loss(per_token, mask, "grpo").item() == pytest.approx(3.25)
    assert aggregate_loss(per_token, mask, "sapo").item() == pytest.approx(3.25)
    assert aggregate_loss(per_token, mask, "bnpo").item() == pytest.approx(3.6)  # 18 / 5
    assert aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(3.6)  # local count 5
    assert aggregate_loss(per_token, mask, "dapo", num_items_in_batch=10).item() == pytest.approx(1.8)
    assert aggregate_loss(per_token, mask, "cispo", num_items_in_batch=torch.tensor(10.0)).item() == pytest.approx(1.8)
    assert aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(2.25)  # 18/(2*4)
    dr_global = aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=4, num_sequences=4)
    assert dr_global.item() == pytest.approx(1.125)  # 18 / (4 * 4)
    # grpo and bnpo are local means: the global normalisers do not change them.
    assert aggregate_loss(per_token, mask, "bnpo", num_items_in_batch=10).item() == pytest.approx(3.6)
    assert aggregate_loss(per_token, mask, "grpo", num_sequences=4).item() == pytest.approx(3.25)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(per_token, mask, "dr_grpo")


def test_every_loss_type_is_wired():
    assert set(LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
    logps, old, adv, mask, _ = batch()
    for loss_type in LOSS_TYPES:
        loss, grad, _ = loss_and_grad(logps, old, adv, mask, loss_type=loss_type, max_completion_length=5)
        assert torch.isfinite(loss) and grad.abs().sum() > 0
        assert (grad[mask == 0] == 0).all()  # padding gets no gradient


# --- where the math says loss types must agree -------------------------------------------------

def test_grpo_equals_bnpo_for_equal_lengths_and_dr_grpo_for_full_lengths():
    logps, old, adv, _, _ = batch()
    full = torch.ones(4, 5)  # every sequence has max_completion_length = 5 active tokens
    grpo = loss_and_grad(logps, old, adv, full, loss_type="grpo")
    bnpo = loss_and_grad(logps, old, adv, full, loss_type="bnpo")
    dr = loss_and_grad(logps, old, adv, full, loss_type="dr_grpo", max_completion_length=5)
    for other in (bnpo, dr):
        torch.testing.assert_close(grpo[0], other[0])
        torch.testing.assert_close(grpo[1], other[1])
    # With unequal lengths grpo weighs short sequences' tokens more: they differ.
    _, _, _, mask, _ = batch()
    assert not torch.allclose(loss_and_grad(logps, old, adv, mask, loss_type="grpo")[0],
                              loss_and_grad(logps, old, adv, mask, loss_type="bnpo")[0])


def test_dapo_without_global_count_is_bnpo():
    logps, old, adv, mask, _ = batch()
    a = loss_and_grad(logps, old, adv, mask, loss_type="dapo")
    b = loss_and_grad(logps, old, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_on_policy_every_objective_is_the_plain_policy_gradient():
    # old_logps=None: r = 1 with gradient dlogp, so d l / d logp_t = -A for clip, cispo and sapo
    # alike; the aggregation then scales it. cispo aggregates like dapo, sapo like grpo.
    logps, _, adv, mask, _ = batch(off_policy=False)
    dapo = loss_and_grad(logps, None, adv, mask, loss_type="dapo")
    # (cispo with a cap above 1: with TRL's default cap epsilon = 0.2 the weight is 0.2, not 1)
    cispo = loss_and_grad(logps, None, adv, mask, loss_type="cispo", epsilon_high=5.0)
    grpo = loss_and_grad(logps, None, adv, mask, loss_type="grpo")
    sapo = loss_and_grad(logps, None, adv, mask, loss_type="sapo")
    torch.testing.assert_close(dapo[1], cispo[1])
    torch.testing.assert_close(grpo[1], sapo[1])
    expected = -adv[:, None] * mask / mask.sum()  # dapo: -A / N on every active token
    torch.testing.assert_close(dapo[1], expected)
    # Values: clip gives -mean(A) over tokens, sapo -2/tau A per token (r = 1 -> gate 2 / tau).
    torch.testing.assert_close(dapo[0], -(adv[:, None] * mask).sum() / mask.sum())
    tau = torch.where(adv > 0, 1.0, 1.05)
    torch.testing.assert_close(sapo[0], (-2 / tau * adv).mean())
    # old_logps equal to the current ones (detached) is the same as None.
    same = loss_and_grad(logps, logps.detach().clone(), adv, mask, loss_type="dapo")
    torch.testing.assert_close(same[1], dapo[1])
    # On-policy the sequence ratio is 1 too: GSPO = token level.
    gspo = loss_and_grad(logps, None, adv, mask, loss_type="dapo", importance_sampling_level="sequence")
    torch.testing.assert_close(gspo[1], dapo[1])


# --- GSPO sequence-level ratio ----------------------------------------------------------------------

def test_sequence_level_ratio_against_hand_loop():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -1.5, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.2, 0.0], [-0.8, -1.9, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 1.0])
    # Row 0: log ratios .1, .2 -> mean .15, s = e^.15 = 1.16183, unclipped.
    # Row 1: .3, .4, .5 -> mean .4, s = e^.4 = 1.49182 > 1.2, clipped.
    # dapo: (2 * -1.16183 + 3 * -1.2) / 5 = -1.18473. Row 0's tokens get d/dlogp = -s / 5 = -0.23237.
    loss, stats = policy_loss(logps, old, adv, mask, importance_sampling_level="sequence")
    loss.backward()
    assert loss.item() == pytest.approx(-1.1847337, abs=1e-6)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.2323668, -0.2323668, 0.0], [0.0, 0.0, 0.0]]))
    assert stats["ratio_mean"].item() == pytest.approx(1.3598285, abs=1e-6)  # (2 s0 + 3 s1) / 5
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.6)  # row 1's 3 tokens of 5

    # The same through GSPO's own definition, one sequence at a time, gradient by autograd.
    for loss_type, extra in [("dapo", {}), ("grpo", {}), ("dr_grpo", {"max_completion_length": 3})]:
        for adv_values in ([1.0, 1.0], [-0.7, 2.0]):
            adv = torch.tensor(adv_values)
            x = logps.detach().clone().requires_grad_()
            terms, n_tokens = [], mask.sum()
            for i in range(2):
                n = int(mask[i].sum())
                s = torch.exp((x[i, :n] - old[i, :n]).mean())
                seq_loss = -torch.min(s * adv[i], s.clamp(0.8, 1.2) * adv[i])
                terms.append({"dapo": n * seq_loss / n_tokens, "grpo": seq_loss / 2,
                              "dr_grpo": n * seq_loss / (2 * 3)}[loss_type])
            sum(terms).backward()
            got = loss_and_grad(logps, old, adv, mask, loss_type=loss_type,
                                importance_sampling_level="sequence", **extra)
            torch.testing.assert_close(got[0], sum(terms).detach())
            torch.testing.assert_close(got[1], x.grad)


# --- KL, importance weights and the entropy mask inside the loss --------------------------------

def test_kl_term_added_per_token():
    # A = 0 silences the policy term. logp - ref = 0.5: k3 = e^-.5 + .5 - 1 = 0.106531, beta 0.1.
    loss, grad, stats = one_token(0.0, 0.0, ref_logps=torch.tensor([[-1.5]]), beta=0.1)
    assert loss == pytest.approx(0.1 * (E(-0.5) - 0.5), abs=1e-6)
    assert grad == pytest.approx(0.1 * (1 - E(-0.5)), abs=1e-6)  # beta * (1 - e^(ref - logp))
    assert stats["kl"].item() == pytest.approx(E(-0.5) - 0.5, abs=1e-6)
    # k1: loss beta * .5 = .05, gradient beta = .1.
    assert one_token(0.0, 0.0, ref_logps=torch.tensor([[-1.5]]), beta=0.1, kl_estimator="k1")[:2] == (
        pytest.approx(0.05), pytest.approx(0.1))
    # beta = 0 with a reference: kl reported, loss untouched.
    loss, _, stats = one_token(0.0, 1.0, ref_logps=torch.tensor([[-1.5]]))
    assert loss == pytest.approx(-1.0) and "kl" in stats
    with pytest.raises(ValueError, match="ref_logps"):
        one_token(0.0, 1.0, beta=0.1)


def test_is_weights_and_entropy_mask_scale_the_policy_term_only():
    logps = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    # On-policy, A = 1: per-token -1 each. Weights .5 and 2 -> (-.5 - 2) / 2 = -1.25 (dapo).
    loss, _ = policy_loss(logps, None, adv, mask, is_weights=torch.tensor([[0.5, 2.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.25)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -1.0]]))
    # Entropy mask drops token 2 from the policy term but not from the count, nor its KL:
    # (-1 + 0) / 2 policy, plus beta * k1 = 0.1 * 0.5 on both tokens / 2 -> -0.5 + 0.05 = -0.45.
    loss, _ = policy_loss(logps, None, adv, mask, entropy_mask=torch.tensor([[True, False]]),
                          beta=0.1, ref_logps=torch.tensor([[-1.5, -1.5]]), kl_estimator="k1")
    assert loss.item() == pytest.approx(-0.45)


def test_clip_stats_by_hand():
    logps = torch.zeros(2, 2, requires_grad=True)
    old = -torch.tensor([[0.5, 0.1], [-0.5, 0.5]])  # log ratios [[.5, .1], [-.5, .5]]
    _, stats = policy_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), ref_logps=logps.detach())
    # Row 0 (A > 0): r = 1.6487 is high-clipped. Row 1 (A < 0): r = 0.6065 is low-clipped, and
    # r = 1.6487 is not clipped at all (A < 0 takes the unclipped branch), so it counts nowhere.
    assert stats["clip_ratio/low_mean"].item() == 0.25
    assert stats["clip_ratio/high_mean"].item() == 0.25
    assert stats["clip_ratio/region_mean"].item() == 0.5
    assert stats["ratio_mean"].item() == pytest.approx((2 * E(.5) + E(.1) + E(-.5)) / 4)  # 1.25229
    assert stats["kl"].item() == 0.0
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_padding_garbage_cannot_leak():
    logps, old, adv, mask, ref = batch()
    clean = loss_and_grad(logps, old, adv, mask, beta=0.1, ref_logps=ref)
    dirty_old, dirty_ref = old.clone(), ref.clone()
    dirty_old[mask == 0], dirty_ref[mask == 0] = -1e4, float("nan")
    with torch.no_grad():
        saved = logps[mask == 0].clone()
        logps[mask == 0] = float("-inf")
    dirty = loss_and_grad(logps, dirty_old, adv, mask, beta=0.1, ref_logps=dirty_ref,
                          is_weights=torch.where(mask.bool(), 1.0, float("nan")))
    with torch.no_grad():
        logps[mask == 0] = saved
    torch.testing.assert_close(clean[0], dirty[0])
    torch.testing.assert_close(clean[1], dirty[1])


# --- splitting a batch over ranks / micro-batches -------------------------------------------------

@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("dr_grpo", "token"), ("dr_grpo", "sequence")])
def test_split_over_parts_with_global_normalisers_equals_whole(loss_type, level):
    logps, old, adv, mask, ref = batch(B=4)
    is_w = torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) + 0.5
    common = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=5, beta=0.04)
    whole = loss_and_grad(logps, old, adv, mask, ref_logps=ref, is_weights=is_w, **common)
    # Two ranks x two micro-batches = four parts of one row each (also two parts of two rows),
    # each normalised by the whole batch's token count / sequence count.
    for parts in ([slice(0, 2), slice(2, 4)], [slice(i, i + 1) for i in range(4)]):
        total_loss, total_grad = 0.0, torch.zeros_like(logps)
        for rows in parts:
            part = logps.detach()[rows].clone().requires_grad_()
            loss, _ = policy_loss(part, old[rows], adv[rows], mask[rows], ref_logps=ref[rows], is_weights=is_w[rows],
                                  num_items_in_batch=mask.sum(), num_sequences=4, **common)
            loss.backward()
            total_loss += loss.detach()
            total_grad[rows] = part.grad
        torch.testing.assert_close(total_loss, whole[0])
        torch.testing.assert_close(total_grad, whole[1])


def test_grpo_split_into_equal_micro_batches_is_their_mean():
    # grpo is a local mean of sequence means: TRL divides by the number of accumulation steps.
    logps, old, adv, mask, _ = batch(B=4)
    whole = loss_and_grad(logps, old, adv, mask, loss_type="grpo")
    total_loss, total_grad = 0.0, torch.zeros_like(logps)
    for rows in (slice(0, 2), slice(2, 4)):
        part = logps.detach()[rows].clone().requires_grad_()
        loss, _ = policy_loss(part, old[rows], adv[rows], mask[rows], loss_type="grpo")
        (loss / 2).backward()
        total_loss += loss.detach() / 2
        total_grad[rows] = part.grad
    torch.testing.assert_close(total_loss, whole[0])
    torch.testing.assert_close(total_grad, whole[1])


# --- rollout correction weights -------------------------------------------------------------------

def test_rollout_correction_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 5.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -0.7, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # Token log ratios [[.5, -1, 0], [.2, -.3, pad]] -> rho [[1.6487, .36788, 1], [1.2214, .74082, -]].
    rho = [[E(.5), E(-1), 1.0], [E(.2), E(-.3), 0.0]]
    w = rollout_correction_weights(trainer, sampler, mask, level="token", mode="truncate", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, rho[0][1], 1.0], rho[1]]))  # 1.6487 -> 1.5
    assert not w.requires_grad
    w = rollout_correction_weights(trainer, sampler, mask, level="token", mode="mask", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[0.0, rho[0][1], 1.0], rho[1]]))  # 1.6487 > 1.5 -> dropped
    # Sequence: row 0 sums to -.5 -> e^-.5 = .60653 on all 3 tokens; row 1 to -.1 -> .90484 on 2.
    s0, s1 = E(-0.5), E(-0.1)
    w = rollout_correction_weights(trainer, sampler, mask, level="sequence", mode="truncate", cap=0.8)
    torch.testing.assert_close(w, torch.tensor([[s0, s0, s0], [0.8, 0.8, 0.0]]))
    w = rollout_correction_weights(trainer, sampler, mask, level="sequence", mode="mask", cap=0.8)
    torch.testing.assert_close(w, torch.tensor([[s0, s0, s0], [0.0, 0.0, 0.0]]))  # .90484 > .8: row dropped
    w = rollout_correction_weights(trainer, sampler, mask, level="sequence", mode="mask", cap=None)
    torch.testing.assert_close(w, torch.tensor([[s0, s0, s0], [s1, s1, 0.0]]))
    with pytest.raises(ValueError, match="mode"):
        rollout_correction_weights(trainer, sampler, mask, mode="clip")


def test_argument_errors():
    logps, old, adv, mask, _ = batch()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logps, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logps, old, adv, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(logps, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv[:2], mask)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, adv, mask, loss_type="dr_grpo")


def test_a_loss_bound_once_equals_the_one_shot_call_and_checks_its_knobs_at_once():
    """make_policy_loss binds the knobs (each loss type exactly its own) and is called with
    tensors only; a bad knob fails when the loss is made, before any tensor."""
    from grpokit.algos import make_policy_loss, policy_loss_fields
    from grpokit.algos.losses import POLICY_LOSSES, token_objective

    g = torch.Generator().manual_seed(0)
    logps, old = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), (torch.rand(3, 5, generator=g) > 0.2).float()
    for loss_type in ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"):
        knobs = dict(epsilon=0.1, epsilon_high=0.3, delta=1.5, dual_clip=3.0, max_completion_length=5)
        # bound from a config: exactly the knobs this loss type reads; policy_loss takes them as a config's
        bound = make_policy_loss(loss_type, **{k: v for k, v in knobs.items() if k in policy_loss_fields(loss_type)})
        a = bound(logps, old, adv, mask, num_items_in_batch=10.0)
        b = policy_loss(logps, old, adv, mask, loss_type=loss_type, num_items_in_batch=10.0, **knobs)
        torch.testing.assert_close(a[0], b[0])
        assert a[1].keys() == b[1].keys()
    assert set(POLICY_LOSSES) == {"clip", "cispo", "sapo", "vespo"}
    # cispo's own knob is its cap; clip's knobs are not its
    w = torch.tensor([[10.0]])
    cispo = token_objective("cispo", epsilon_high=2.0)
    assert float(cispo(w, torch.tensor([[1.0]]), torch.tensor([[1.0]]))[0]) == -2.0  # -min(10, 2) * A * logp
    with pytest.raises(ValueError, match="delta, dual_clip: not a knob of the 'cispo' objective"):
        token_objective("cispo", epsilon_high=2.0, delta=1.1, dual_clip=5.0)
    with pytest.raises(ValueError, match="dual_clip=0.5 must be > 1"):
        make_policy_loss("grpo", dual_clip=0.5)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        make_policy_loss("grpo", importance_sampling_level="word")
