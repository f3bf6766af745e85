"""KL estimators k1, k2, k3."""

import math

import pytest
import torch

from grpokit.algos import KL_ESTIMATORS, kl_penalty


@pytest.mark.parametrize("estimator", sorted(KL_ESTIMATORS))
def test_zero_when_policy_equals_reference(estimator):
    logps = torch.randn(3, 5)
    assert torch.equal(kl_penalty(logps, logps.clone(), estimator), torch.zeros(3, 5))


def test_hand_values_and_k3_gradient():
    logps = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5]])
    # log r = ref - logp = -0.5
    assert kl_penalty(logps, ref, "k1").item() == pytest.approx(0.5)  # logp - ref
    assert kl_penalty(logps, ref, "k2").item() == pytest.approx(0.125)  # 0.5 * 0.5^2
    k3 = kl_penalty(logps, ref)  # default k3: e^-0.5 + 0.5 - 1 = 0.106531
    assert k3.item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)
    k3.sum().backward()
    # d k3 / d logp = 1 - e^(ref - logp) = 1 - e^-0.5 = 0.393469; ref gets none (it is detached).
    assert logps.grad.item() == pytest.approx(1 - math.exp(-0.5), abs=1e-6)


def test_k3_and_k2_non_negative():
    torch.manual_seed(0)
    logps, ref = 3 * torch.randn(1000), 3 * torch.randn(1000)
    assert (kl_penalty(logps, ref, "k3") >= 0).all()
    assert (kl_penalty(logps, ref, "k2") >= 0).all()
    assert (kl_penalty(logps, ref, "k1") < 0).any()  # k1 can be negative per sample


def test_k1_k3_unbiased_k2_close_by_exact_expectation():
    # Exact expectation over a 6-token vocabulary: E_{x~p}[k(x)] = sum_x p(x) k(x).
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(6, dtype=torch.float64), 0)
    logq = torch.log_softmax(logp + 0.1 * torch.randn(6, dtype=torch.float64), 0)
    true_kl = (logp.exp() * (logp - logq)).sum()
    expect = {k: (logp.exp() * kl_penalty(logp, logq, k)).sum() for k in KL_ESTIMATORS}
    torch.testing.assert_close(expect["k1"], true_kl)
    torch.testing.assert_close(expect["k3"], true_kl)
    assert expect["k2"].item() == pytest.approx(true_kl.item(), rel=0.05)  # second-order agreement


def test_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 2))
