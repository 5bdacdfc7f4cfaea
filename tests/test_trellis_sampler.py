"""Flow Euler sampler: TRELLIS time convention, schedule warp, and CFG inside its interval."""

import pytest
import torch

from gap3d.trellis.config import SamplerConfig
from gap3d.trellis.sampler import FlowEulerSampler, model_time, time_schedule


class RecordingLinearFlow:
    """v(x, t, cond) = a * x + cond_mean, recording the times it was called with."""

    def __init__(self, a: float = 0.5):
        self.a = a
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((t.clone(), cond.abs().sum().item() == 0))
        return self.a * x + cond.mean(dim=(1, 2)).view(-1, 1)


def test_model_time_is_sampler_time_times_1000():
    t = model_time(0.25, batch_size=3, device=torch.device("cpu"))
    torch.testing.assert_close(t, torch.full((3,), 250.0))
    assert t.dtype == torch.float32


def test_time_schedule_without_rescale_is_uniform_from_one_to_zero():
    assert time_schedule(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_time_schedule_rescale_matches_hand_computation():
    # r = 3: t' = 3 t / (1 + 2 t); t = 0.5 -> 1.5 / 2 = 0.75
    assert time_schedule(2, 3.0) == pytest.approx([1.0, 0.75, 0.0])


def test_model_is_fed_times_scaled_by_1000():
    model = RecordingLinearFlow()
    sampler = FlowEulerSampler(SamplerConfig(name="FlowEulerSampler", steps=2))
    sampler.sample(model, torch.ones(1, 2), torch.ones(1, 3, 4))
    assert [call[0].item() for call in model.calls] == [1000.0, 500.0]


def test_guided_step_matches_hand_computation_inside_the_interval():
    # One step from t=1 to 0 with s = 2: v = 3 v(cond) - 2 v(0) where v(x, c) = 0.5 x + mean(c).
    sampler = FlowEulerSampler(SamplerConfig(steps=1, cfg_strength=2.0, cfg_interval=(0.5, 1.0)))
    x0 = torch.tensor([[2.0, -4.0]])
    cond = torch.full((1, 3, 4), 0.25)
    out = sampler.sample(RecordingLinearFlow(), x0, cond)
    velocity = 3 * (0.5 * x0 + 0.25) - 2 * (0.5 * x0)
    torch.testing.assert_close(out, x0 - 1.0 * velocity)


def test_guidance_is_skipped_outside_the_interval():
    # Steps start at t = 1, 0.5: only t = 1 lies in [0.75, 1], so the negative condition is used once.
    model = RecordingLinearFlow()
    sampler = FlowEulerSampler(SamplerConfig(steps=2, cfg_strength=5.0, cfg_interval=(0.75, 1.0)))
    sampler.sample(model, torch.ones(1, 2), torch.ones(1, 3, 4))
    assert [is_negative for _, is_negative in model.calls] == [False, True, False]


def test_overrides_take_precedence_over_pipeline_settings():
    model = RecordingLinearFlow()
    sampler = FlowEulerSampler(SamplerConfig(steps=25, cfg_strength=7.5))
    sampler.sample(model, torch.ones(1, 2), torch.ones(1, 3, 4), steps=3, cfg_strength=0.0)
    assert len(model.calls) == 3


def test_plain_euler_sampler_never_guides():
    model = RecordingLinearFlow()
    FlowEulerSampler(SamplerConfig(name="FlowEulerSampler", steps=2, cfg_strength=3.0)).sample(
        model, torch.ones(1, 2), torch.ones(1, 3, 4)
    )
    assert not any(is_negative for _, is_negative in model.calls)


def test_negative_condition_must_match_condition_shape():
    sampler = FlowEulerSampler(SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="neg_cond"):
        sampler.sample(RecordingLinearFlow(), torch.ones(1, 2), torch.ones(1, 3, 4), neg_cond=torch.zeros(1, 2, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "DDIMSampler"}, "not supported"),
        ({"steps": 0}, "steps"),
        ({"cfg_interval": (0.8, 0.2)}, "cfg_interval"),
    ],
)
def test_bad_sampler_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)
