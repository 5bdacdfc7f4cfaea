"""Rectified flow: analytic cases for the path and samplers, CFG, determinism, and an overfitting run."""

import pytest
import torch
from torch import nn

from gap3d.aligner import AlignerDiT
from gap3d.config import AlignerConfig, FlowConfig
from gap3d.flow import flow_matching_loss, guided_velocity, interpolate, sample, sample_t, velocity_target
from gap3d.metrics import token_cosine


class PointMassVelocity(nn.Module):
    """Exact velocity field when all data sits at `target`: x_t = (1-t) target + t noise => v = (x - target) / t."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target

    def forward(self, x, t, cond, drop_cond=None):
        return (x - self.target) / t.view(-1, 1, 1)


class ConstantVelocity(nn.Module):
    """v = cond-dependent constant: 2 for the condition, 1 for the null condition (per row)."""

    def forward(self, x, t, cond, drop_cond=None):
        value = torch.full((x.shape[0],), 2.0) if drop_cond is None else torch.where(drop_cond, 1.0, 2.0)
        return value.view(-1, 1, 1).expand_as(x)


def test_path_is_data_at_t0_and_noise_at_t1():
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)
    torch.testing.assert_close(interpolate(x0, noise, torch.full((2,), 0.25)), 0.75 * x0 + 0.25 * noise)


def test_velocity_target_is_the_time_derivative_of_the_path():
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t, dt = torch.full((2,), 0.3), 1e-3
    finite_difference = (interpolate(x0, noise, t + dt) - interpolate(x0, noise, t)) / dt
    torch.testing.assert_close(velocity_target(x0, noise), finite_difference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_samplers_integrate_the_exact_point_mass_field_to_its_target(solver):
    target = torch.randn(1, 3, 4)
    out = sample(
        PointMassVelocity(target),
        torch.zeros(2, 1, 1),
        (3, 4),
        steps=5,
        cfg_scale=1.0,
        solver=solver,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, target.expand(2, 3, 4), atol=1e-5, rtol=1e-5)


def test_euler_moves_noise_by_minus_the_velocity_over_the_unit_interval():
    noise = torch.randn(2, 3, 4)
    out = sample(ConstantVelocity(), torch.zeros(2, 1, 1), (3, 4), steps=7, cfg_scale=1.0, noise=noise)
    torch.testing.assert_close(out, noise - 2.0)


def test_classifier_free_guidance_extrapolates_from_null_to_condition():
    x, t, cond = torch.zeros(2, 3, 4), torch.full((2,), 0.5), torch.zeros(2, 1, 1)
    v = guided_velocity(ConstantVelocity(), x, t, cond, cfg_scale=3.0)
    torch.testing.assert_close(v, torch.full_like(x, 1.0 + 3.0 * (2.0 - 1.0)))


def test_sampler_is_deterministic_per_seed_and_differs_across_seeds():
    model = ConstantVelocity()
    run = lambda seed: sample(
        model, torch.zeros(2, 1, 1), (3, 4), 4, 2.0, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_logit_normal_times_are_in_the_open_unit_interval_centred_on_one_half():
    t = sample_t(20000, FlowConfig(time_schedule="logit_normal"), torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)


def test_loss_weights_cls_registers_and_patches_separately():
    x0 = torch.zeros(1, 1 + 4 + 4, 2)

    class Fixed(nn.Module):
        def forward(self, x, t, cond, drop_cond=None):
            # prediction = target + error: 1 on CLS, 2 on registers, 3 on patches
            error = torch.tensor([1.0] + [2.0] * 4 + [3.0] * 4).view(1, -1, 1)
            return (x - x0) / t.view(-1, 1, 1) + error  # exact velocity for a point mass at x0, plus error

    losses = flow_matching_loss(Fixed(), x0, torch.zeros(1, 1, 1), FlowConfig(cond_dropout=0.0), num_registers=4)
    assert (losses["cls"].item(), losses["registers"].item(), losses["patches"].item()) == pytest.approx(
        (1.0, 4.0, 9.0), rel=1e-4
    )
    assert losses["loss"].item() == pytest.approx(0.3 * 1 + 0.3 * 4 + 0.4 * 9, rel=1e-4)


def test_invalid_flow_config_raises_naming_the_key():
    with pytest.raises(ValueError, match="flow.solver"):
        FlowConfig(solver="rk4")
    with pytest.raises(ValueError, match="flow.loss_weights"):
        FlowConfig(loss_weights={"patches": 1.0})


def test_overfitting_a_few_pairs_lowers_the_loss_and_the_sampler_reproduces_their_targets():
    torch.manual_seed(0)
    config = AlignerConfig(
        token_dim=16,
        grid_size=4,
        num_special_tokens=5,
        cond_dim=16,
        num_cond_tokens=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        null_condition="learned",
    )
    model = AlignerDiT(config)
    g = torch.Generator().manual_seed(0)
    targets = torch.nn.functional.layer_norm(torch.randn(4, config.num_tokens, 16, generator=g), (16,))
    conds = torch.randn(4, 4, 16, generator=g)
    flow = FlowConfig(time_schedule="logit_normal", cond_dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(800):  # each step sees every pair twice, at different times and noise
        loss = flow_matching_loss(
            model, targets.repeat(2, 1, 1), conds.repeat(2, 1, 1), flow, num_registers=4, generator=g
        )["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    generated = sample(
        model.eval(),
        conds,
        (config.num_tokens, 16),
        steps=20,
        cfg_scale=1.0,
        solver="heun",
        generator=torch.Generator().manual_seed(1),
    )
    assert token_cosine(generated, targets).min().item() > 0.9
