"""Rectified-flow matching for the aligner: training loss and samplers.

Time convention (the project's): t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x0 + t * noise,        velocity target v = dx_t/dt = noise - x0.
Sampling integrates dx/dt = v from t = 1 (pure noise) down to t = 0 with Euler or Heun steps, and
classifier-free guidance v = v_null + scale * (v_cond - v_null). TRELLIS's samplers also put data at
t = 0 but feed their models 1000 * t; that conversion lives in gap3d/trellis, not here.
"""

import torch
from torch import nn

from gap3d.cancellation import raise_if_cancelled
from gap3d.config import FlowConfig


def sample_t(
    batch_size: int, config: FlowConfig, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Training times (B,) in (0, 1) from the configured schedule."""
    if config.time_schedule == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    normal = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(config.logit_normal_mean + config.logit_normal_std * normal)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t (B,) broadcast over (B, N, D)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = noise - x0."""
    return noise - x0


def grouped_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: dict[str, float], num_registers: int
) -> dict[str, torch.Tensor]:
    """Per-group MSE over (B, N, D) with token 0 = CLS, 1..num_registers = registers, rest = patches; plus 'loss'."""
    err = (pred.float() - target.float()).pow(2)
    groups = {
        "cls": err[:, :1].mean(),
        "registers": err[:, 1 : 1 + num_registers].mean(),
        "patches": err[:, 1 + num_registers :].mean(),
    }
    groups["loss"] = sum(weights[name] * value for name, value in groups.items()) / sum(weights.values())
    return groups


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    config: FlowConfig,
    num_registers: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Rectified-flow loss of `model` on targets x0 (B, N, D) given cond (B, s, d); returns 'loss' and per-group
    MSEs."""
    batch = x0.shape[0]
    t = sample_t(batch, config, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    drop = torch.rand(batch, generator=generator, device=x0.device) < config.cond_dropout
    pred = model(interpolate(x0, noise, t), t, cond, drop)
    return grouped_mse(pred, velocity_target(x0, noise), config.loss_weights, num_registers)


def guided_velocity(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cfg_scale: float
) -> torch.Tensor:
    """v_null + scale (v_cond - v_null), both halves in one doubled batch; scale 1 skips the null pass."""
    if cfg_scale == 1.0:
        return model(x, t, cond, None)
    batch = x.shape[0]
    drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(x.device)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop)
    v_cond, v_null = v.chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


@torch.no_grad()
def sample(
    model: nn.Module,
    cond: torch.Tensor,
    shape: tuple[int, int],
    steps: int,
    cfg_scale: float,
    solver: str = "euler",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise at t=1 to data at t=0 -> (B, N, D); `shape` is (N, D), noise drawn from `generator`."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    batch = cond.shape[0]
    if noise is None:
        noise = torch.randn(
            (batch, *shape), generator=generator, device=cond.device if generator is None else generator.device
        )
    x = noise.to(cond.device, cond.dtype)
    times = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        raise_if_cancelled()
        t_batch = t_cur.expand(batch)
        v = guided_velocity(model, x, t_batch, cond, cfg_scale)
        x_next = x + (t_next - t_cur) * v
        if solver == "heun" and t_next > 0:
            v_next = guided_velocity(model, x_next, t_next.expand(batch), cond, cfg_scale)
            x_next = x + (t_next - t_cur) * 0.5 * (v + v_next)
        x = x_next
    return x
