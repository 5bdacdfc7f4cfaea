"""TRELLIS stage-1 training objectives, checked against analytic flows and against our sampler's convention."""

import pytest
import torch

from gap3d.trellis.config import SamplerConfig
from gap3d.trellis.objectives import (
    diffuse,
    drop_condition,
    flow_loss,
    kl_to_standard_normal,
    sample_time,
    velocity_target,
)
from gap3d.trellis.sampler import MODEL_TIME_SCALE, FlowEulerSampler

SIGMA_MIN = 1e-5


class PointMassFlow:
    """The exact velocity field of TRELLIS's diffusion when all data sits at one point c.

    x_t = (1 - t) c + s(t) noise with s(t) = sigma_min + (1 - sigma_min) t, so noise = (x_t - (1 - t) c) / s(t)
    and v = (1 - sigma_min) noise - c. Called like a TRELLIS network: time on the [0, 1000] scale.
    """

    def __init__(self, c: torch.Tensor):
        self.c = c

    def __call__(self, x, times, cond):
        t = (times / MODEL_TIME_SCALE).view(-1, *[1] * (x.ndim - 1))
        noise = (x - (1 - t) * self.c) / (SIGMA_MIN + (1 - SIGMA_MIN) * t)
        return (1 - SIGMA_MIN) * noise - self.c


def test_diffusion_is_data_at_time_zero_and_noise_at_time_one():
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(diffuse(x0, noise, torch.zeros(3), SIGMA_MIN), x0 + SIGMA_MIN * noise)
    torch.testing.assert_close(diffuse(x0, noise, torch.ones(3), SIGMA_MIN), noise)


def test_velocity_target_is_the_time_derivative_of_the_diffusion():
    x0, noise, t = (
        torch.randn(2, 5, dtype=torch.float64),
        torch.randn(2, 5, dtype=torch.float64),
        torch.tensor([0.3, 0.8], dtype=torch.float64),
    )
    step = 1e-6
    derivative = (diffuse(x0, noise, t + step, SIGMA_MIN) - diffuse(x0, noise, t - step, SIGMA_MIN)) / (2 * step)
    torch.testing.assert_close(velocity_target(x0, noise, SIGMA_MIN), derivative)


@pytest.mark.parametrize("rescale_t", [1.0, 3.0])
def test_our_sampler_integrates_the_trained_convention_back_to_the_data(rescale_t):
    # Trajectories of a point mass are straight lines, so Euler lands exactly on c (plus the sigma_min floor).
    c = torch.randn(2, 3, 4, 4, 4)
    noise = torch.randn(2, 3, 4, 4, 4)
    sampler = FlowEulerSampler(SamplerConfig(name="FlowEulerSampler", steps=7, rescale_t=rescale_t))
    sample = sampler.sample(PointMassFlow(c), noise, torch.zeros(2, 1, 8))
    torch.testing.assert_close(sample, c + SIGMA_MIN * noise, atol=1e-4, rtol=1e-4)


def test_the_exact_velocity_field_has_zero_training_loss():
    # flow_loss feeds the network t * 1000 and x_t = diffuse(...): the analytic field must then be exact.
    c = torch.randn(4, 8, 2, 2, 2)
    loss = flow_loss(PointMassFlow(c), c, torch.zeros(4, 3, 8), torch.Generator().manual_seed(0), SIGMA_MIN)
    assert float(loss) < 1e-8


def test_a_reversed_time_convention_has_a_large_training_loss():
    c = torch.randn(4, 8, 2, 2, 2)
    reversed_flow = PointMassFlow(c)
    loss = flow_loss(
        lambda x, times, cond: -reversed_flow(x, MODEL_TIME_SCALE - times, cond),
        c,
        torch.zeros(4, 3, 8),
        torch.Generator().manual_seed(0),
    )
    assert float(loss) > 0.1


def test_logit_normal_times_have_the_configured_median():
    t = sample_time(20000, mean=1.0, std=1.0, generator=torch.Generator().manual_seed(0))
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert float(t.median()) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))), abs=0.01)


def test_dropped_conditions_are_all_zero_and_kept_ones_untouched():
    cond = torch.randn(2000, 3, 4) + 5
    dropped = drop_condition(cond, 0.25, torch.Generator().manual_seed(0))
    zero = dropped.flatten(1).abs().sum(1) == 0
    assert 0.2 < float(zero.float().mean()) < 0.3
    torch.testing.assert_close(dropped[~zero], cond[~zero])


def test_kl_vanishes_for_the_standard_normal_and_matches_the_closed_form():
    assert float(kl_to_standard_normal(torch.zeros(5), torch.zeros(5))) == 0.0
    mean, logvar = torch.tensor([1.0]), torch.tensor([0.5])
    expected = 0.5 * (1.0 + torch.exp(torch.tensor(0.5)) - 0.5 - 1.0)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), expected)
