"""cpo_pair_losses against the papers' formulas, written out independently (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch


def _args(tmp_path, **kwargs):
    from posttrain_cpo.config import CPOConfig

    return CPOConfig(output_dir=str(tmp_path), **kwargs)


LOGPS_W = torch.tensor([-0.4, -1.3, -2.0, -0.9], dtype=torch.float64)  # length-normalized log-probs
LOGPS_L = torch.tensor([-0.8, -1.1, -2.6, -0.95], dtype=torch.float64)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_simpo_is_the_papers_eq6(tmp_path):
    from posttrain_cpo.trainer import cpo_pair_losses

    beta, gamma = 2.5, 1.375
    losses, rw, rl = cpo_pair_losses(_args(tmp_path, loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0), LOGPS_W, LOGPS_L)
    for i in range(4):  # SimPO Eq. 6: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)
        assert losses[i].item() == pytest.approx(-_logsig(beta * LOGPS_W[i].item() - beta * LOGPS_L[i].item() - gamma), rel=1e-12)
    assert torch.allclose(rw, beta * LOGPS_W) and torch.allclose(rl, beta * LOGPS_L)


def test_alphapo_reward_is_the_papers_and_tends_to_simpo_as_alpha_goes_to_zero(tmp_path):
    from posttrain_cpo.trainer import cpo_pair_losses

    beta, gamma, alpha = 2.5, 0.1, 0.25
    losses, rw, _ = cpo_pair_losses(_args(tmp_path, loss_type="alphapo", alpha=alpha, beta=beta, simpo_gamma=gamma), LOGPS_W, LOGPS_L)
    for i in range(4):  # AlphaPO: r = -(beta/alpha) (pi(y|x)^(-alpha/|y|) - 1), loss -log sigma(r_w - r_l - gamma)
        r_w = -(beta / alpha) * (math.exp(LOGPS_W[i].item()) ** -alpha - 1)
        r_l = -(beta / alpha) * (math.exp(LOGPS_L[i].item()) ** -alpha - 1)
        assert losses[i].item() == pytest.approx(-_logsig(r_w - r_l - gamma), rel=1e-12)
        assert rw[i].item() == pytest.approx(r_w, rel=1e-12)
    tiny, _, _ = cpo_pair_losses(_args(tmp_path, loss_type="alphapo", alpha=1e-7, beta=beta, simpo_gamma=gamma), LOGPS_W, LOGPS_L)
    simpo, _, _ = cpo_pair_losses(_args(tmp_path, loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0), LOGPS_W, LOGPS_L)
    torch.testing.assert_close(tiny, simpo, rtol=1e-5, atol=0)


def test_cpo_sigmoid_with_smoothing_is_conservative_eq3(tmp_path):
    from posttrain_cpo.trainer import cpo_pair_losses

    beta, eps = 0.1, 0.2
    sums_w, sums_l = LOGPS_W * 30, LOGPS_L * 25  # summed log-probs for 'sigmoid'
    losses, _, _ = cpo_pair_losses(_args(tmp_path, loss_type="sigmoid", beta=beta, label_smoothing=eps), sums_w, sums_l)
    for i in range(4):  # CPO Eq. 3, with the labels flipped with probability eps
        z = beta * (sums_w[i].item() - sums_l[i].item())
        assert losses[i].item() == pytest.approx(-(1 - eps) * _logsig(z) - eps * _logsig(-z), rel=1e-12)
