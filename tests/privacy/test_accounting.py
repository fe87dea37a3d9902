"""kdkit's ε is Opacus' ε for the same q, σ, steps and δ; σ from a target ε meets it."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from kdkit.privacy import epsilon, noise_for_epsilon


def _opacus_epsilon(accountant, q, sigma, steps, delta):
    for _ in range(steps):  # stepped like a training run, not given the history in one go
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.1, 300, 1e-5), (0.05, 0.8, 120, 1 / 2000),
                                                 (0.2, 2.0, 40, 1e-4)])
def test_rdp_epsilon_equals_opacus(q, sigma, steps, delta):
    ours = epsilon(q, sigma, steps, delta, accountant="rdp")
    assert ours == pytest.approx(_opacus_epsilon(RDPAccountant(), q, sigma, steps, delta), rel=1e-12)
    assert 0 < ours < math.inf


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.1, 300, 1e-5), (0.05, 0.8, 120, 1 / 2000)])
def test_prv_epsilon_equals_opacus_and_is_tighter_than_rdp(q, sigma, steps, delta):
    ours = epsilon(q, sigma, steps, delta, accountant="prv")
    assert ours == pytest.approx(_opacus_epsilon(PRVAccountant(), q, sigma, steps, delta), rel=1e-9)
    assert ours < epsilon(q, sigma, steps, delta, accountant="rdp")


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    assert epsilon(0.02, 1.0, 100, 1e-5) < epsilon(0.02, 1.0, 400, 1e-5)
    assert epsilon(0.02, 2.0, 100, 1e-5) < epsilon(0.02, 1.0, 100, 1e-5)
    assert epsilon(0.02, 1.0, 0, 1e-5) == 0.0
    assert epsilon(0.02, 0.0, 10, 1e-5) == math.inf


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_for_epsilon_meets_the_target(accountant):
    sigma = noise_for_epsilon(2.0, 1e-4, 0.02, 200, accountant=accountant)
    reached = epsilon(0.02, sigma, 200, 1e-4, accountant=accountant)
    assert reached <= 2.0
    assert reached > 2.0 - 0.05  # not a needlessly large σ


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="accountant"):
        epsilon(0.1, 1.0, 10, 1e-5, accountant="gdp2")
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon(1.5, 1.0, 10, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon(0.1, 1.0, 10, 0.0)
