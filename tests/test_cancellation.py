"""Cooperative cancellation: a token's deadline and flag stop the aligner's and TRELLIS's samplers between steps."""

import time

import pytest
import torch
from torch import nn

from gap3d.cancellation import Cancelled, CancelToken, cancellable, raise_if_cancelled
from gap3d.flow import sample
from gap3d.trellis.config import SamplerConfig
from gap3d.trellis.sampler import FlowEulerSampler


class CancellingVelocity(nn.Module):
    """v = 0, counting its calls; cancels `token` during call number `cancel_at`."""

    def __init__(self, token: CancelToken, cancel_at: int):
        super().__init__()
        self.token, self.cancel_at, self.calls = token, cancel_at, 0

    def forward(self, x, t, cond, drop_cond=None):
        self.calls += 1
        if self.calls == self.cancel_at:
            self.token.cancel()
        return torch.zeros_like(x)


def test_a_token_past_its_deadline_raises_with_reason_deadline():
    with pytest.raises(Cancelled) as caught:
        CancelToken(deadline=time.time() - 1).check()
    assert caught.value.reason == "deadline"


def test_a_cancelled_token_raises_with_reason_cancelled():
    token = CancelToken(deadline=time.time() + 60)
    token.check()
    token.cancel()
    with pytest.raises(Cancelled) as caught:
        token.check()
    assert caught.value.reason == "cancelled"


def test_the_check_does_nothing_outside_cancellable():
    raise_if_cancelled()


def test_entering_cancellable_with_an_expired_token_raises_before_any_work():
    with pytest.raises(Cancelled), cancellable(CancelToken(deadline=time.time() - 1)):
        pytest.fail("the body must not run")


def test_the_aligner_sampler_stops_at_the_step_after_cancellation():
    token = CancelToken()
    model = CancellingVelocity(token, cancel_at=3)
    with pytest.raises(Cancelled), cancellable(token):
        sample(model, torch.zeros(1, 2, 4), (5, 4), steps=50, cfg_scale=1.0, noise=torch.zeros(1, 5, 4))
    assert model.calls == 3  # CFG off: one call per step, and the fourth step never starts


def test_the_trellis_sampler_stops_at_the_step_after_cancellation():
    token = CancelToken()
    model = CancellingVelocity(token, cancel_at=2)
    config = SamplerConfig(
        name="FlowEulerGuidanceIntervalSampler",
        steps=25,
        cfg_strength=0.0,
        cfg_interval=(0.0, 1.0),
        rescale_t=1.0,
        sigma_min=1e-5,
    )
    with pytest.raises(Cancelled), cancellable(token):
        FlowEulerSampler(config).sample(model, torch.zeros(1, 8), torch.zeros(1, 3, 4))
    assert model.calls == 2


def test_sampling_without_a_token_runs_every_step():
    model = CancellingVelocity(CancelToken(), cancel_at=-1)
    sample(model, torch.zeros(1, 2, 4), (5, 4), steps=7, cfg_scale=1.0, noise=torch.zeros(1, 5, 4))
    assert model.calls == 7
