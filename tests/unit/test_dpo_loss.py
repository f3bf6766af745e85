"""DPO (sigmoid) and IPO losses: worked numbers and gradients."""

import math

import pytest
import torch

from grpokit.algos import DPO_AVERAGE_LOGPS, dpo_loss, sequence_logps


def logps(*v):
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def test_sigmoid_dpo_worked_numbers_and_gradients():
    # pi_w = -1, ref_w = -2 (chosen log-ratio +1); pi_l = -3, ref_l = -2.5 (rejected log-ratio -0.5)
    # margin h = 1 - (-0.5) = 1.5, beta = 0.5: loss = -log sigmoid(0.75) = log(1 + e^-0.75) = 0.386871
    # dloss/dpi_w = -beta * sigmoid(-beta h) = -0.5 * 0.320821 = -0.160411; dloss/dpi_l = +0.160411
    # implicit rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * -0.5 = -0.25
    pw, pl = logps(-1.0), logps(-3.0)
    losses, rc, rr = dpo_loss(pw, pl, torch.tensor([-2.0], dtype=torch.float64),
                              torch.tensor([-2.5], dtype=torch.float64), beta=0.5)
    assert float(losses.detach()) == pytest.approx(0.386871, abs=1e-6)
    assert float(rc) == pytest.approx(0.5) and float(rr) == pytest.approx(-0.25)
    losses.sum().backward()
    assert float(pw.grad) == pytest.approx(-0.160411, abs=1e-6)
    assert float(pl.grad) == pytest.approx(0.160411, abs=1e-6)


def test_sigmoid_dpo_at_zero_margin_is_log_2():
    # the policy equals the reference: h = 0, loss = log 2, gradient -beta / 2 on the chosen
    pw = logps(-4.0, -1.0)
    losses, _, _ = dpo_loss(pw, logps(-2.0, -3.0), torch.tensor([-4.0, -1.0], dtype=torch.float64),
                            torch.tensor([-2.0, -3.0], dtype=torch.float64), beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64))
    losses.sum().backward()
    assert torch.allclose(pw.grad, torch.full((2,), -0.05, dtype=torch.float64))


def test_label_smoothing():
    # e = 0.1, beta h = 0.75: 0.9 * 0.386871 + 0.1 * (0.75 + 0.386871) = 0.461871
    # d/dh = -(1 - e) beta sigmoid(-beta h) + e beta sigmoid(beta h) = -0.144369 + 0.033959 = -0.110411
    pw = logps(-1.0)
    losses, _, _ = dpo_loss(pw, logps(-3.0), torch.tensor([-2.0], dtype=torch.float64),
                            torch.tensor([-2.5], dtype=torch.float64), beta=0.5, label_smoothing=0.1)
    assert float(losses.detach()) == pytest.approx(0.461871, abs=1e-6)
    losses.sum().backward()
    assert float(pw.grad) == pytest.approx(-0.110411, abs=1e-6)


def test_ipo_worked_numbers_and_gradients():
    # beta = 0.5 -> target margin 1 / (2 beta) = 1.
    # pair 0: h = 1.5 -> loss (1.5 - 1)^2 = 0.25, dloss/dpi_w = 2 (h - 1) = 1.0 (pushes the margin DOWN)
    # pair 1: h = 1.0 -> loss 0, gradient 0 (IPO stops at the target; DPO would keep pushing)
    # pair 2: h = 0   -> loss 1, dloss/dpi_w = -2
    pw, pl = logps(-1.0, -1.0, -2.0), logps(-3.0, -2.5, -2.0)
    ref_w = torch.tensor([-2.0, -2.0, -2.0], dtype=torch.float64)
    ref_l = torch.tensor([-2.5, -2.5, -2.0], dtype=torch.float64)
    losses, _, _ = dpo_loss(pw, pl, ref_w, ref_l, beta=0.5, loss_type="ipo")
    assert torch.allclose(losses, torch.tensor([0.25, 0.0, 1.0], dtype=torch.float64))
    losses.sum().backward()
    assert torch.allclose(pw.grad, torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64))
    assert torch.allclose(pl.grad, -pw.grad)


def test_reference_gets_no_gradient():
    ref = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(logps(-1.0), logps(-3.0), ref, torch.tensor([-2.5]), beta=0.1)
    losses.sum().backward()
    assert ref.grad is None


def test_sequence_logps_sum_for_dpo_mean_for_ipo():
    # [-1, -2, -3] -> sum -6, mean -2; [-0.5, -0.5, pad] -> sum -1, mean -0.5
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert sequence_logps(tok, mask).tolist() == [-6.0, -1.0]
    assert sequence_logps(tok, mask, average=True).tolist() == [-2.0, -0.5]
    assert DPO_AVERAGE_LOGPS == {"sigmoid": False, "ipo": True}


def test_bad_arguments():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(one, one, one, one, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(one, one, one, one, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(one, one, one, one, loss_type="ipo", label_smoothing=0.1)


def test_best_worst_pairs_from_groups():
    from grpokit.algos import best_worst_pairs

    nan = float("nan")
    rewards = torch.tensor([
        0.0, 1.0, 0.5,      # group 0: best 1 (1.0), worst 0 (0.0)
        1.0, 1.0, 1.0,      # group 1: no spread -> skipped
        nan, 0.2, 0.7,      # group 2: NaN left out: best 8, worst 7
        nan, nan, 3.0,      # group 3: one valid reward -> skipped
        0.3, 0.9, 0.9,      # group 4: tie for best -> first index 13; worst 12
    ])
    chosen, rejected = best_worst_pairs(rewards, 3)
    assert chosen.tolist() == [1, 8, 13]
    assert rejected.tolist() == [0, 7, 12]
    with pytest.raises(ValueError, match="group_size"):
        best_worst_pairs(rewards, 4)
