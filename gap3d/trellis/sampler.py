"""TRELLIS's flow Euler sampler with classifier-free guidance inside a time interval.

Time convention (TRELLIS = ours): t=1 is noise, t=0 is data, x_t = (1 - t) x0 + t noise (TRELLIS adds
a sigma_min floor that only affects its x0 estimate). The network is fed
t * MODEL_TIME_SCALE (1000): `model_time` here, and gap3d.trellis.objectives for training, which must agree.
The sampler needs only `x - c * v` and `a * v1 - b * v2` on the state, so it also drives stage 2, whose state
is a sparse tensor.
"""

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gap3d.cancellation import raise_if_cancelled
from gap3d.trellis.config import SamplerConfig

logger = logging.getLogger(__name__)

# TRELLIS's models were trained with time embedded on a [0, 1000] scale.
MODEL_TIME_SCALE = 1000.0


def model_time(t: float, batch_size: int, device: torch.device) -> torch.Tensor:
    """Sampler time t in [0, 1] -> the (B,) float32 tensor the TRELLIS network takes (t * 1000)."""
    return torch.full((batch_size,), MODEL_TIME_SCALE * float(t), dtype=torch.float32, device=device)


def time_schedule(steps: int, rescale_t: float) -> list[float]:
    """steps + 1 times from 1 to 0, warped by t' = r t / (1 + (r - 1) t)."""
    grid = np.linspace(1.0, 0.0, steps + 1)
    return [float(t) for t in rescale_t * grid / (1.0 + (rescale_t - 1.0) * grid)]


def guided_velocity(
    model: Callable[..., Any],
    x: Any,
    t: float,
    cond: torch.Tensor,
    neg_cond: torch.Tensor,
    cfg_strength: float,
    cfg_interval: tuple[float, float],
) -> Any:
    """(1 + s) v(x, cond) - s v(x, neg_cond) while lo <= t <= hi, else v(x, cond). Same shape as x."""
    batch_size = cond.shape[0]
    times = model_time(t, batch_size, cond.device)
    velocity = model(x, times, cond)
    if cfg_strength == 0 or not cfg_interval[0] <= t <= cfg_interval[1]:
        return velocity
    return (1 + cfg_strength) * velocity - cfg_strength * model(x, times, neg_cond)


class FlowEulerSampler:
    """Euler integration of a flow model's velocity from t=1 to t=0, with interval-limited CFG."""

    def __init__(self, config: SamplerConfig):
        self.config = config

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., Any],
        noise: Any,
        cond: torch.Tensor,
        neg_cond: torch.Tensor | None = None,
        steps: int | None = None,
        cfg_strength: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        rescale_t: float | None = None,
    ) -> Any:
        """noise (B, ...) at t=1 -> sample at t=0. cond (B, N, D); neg_cond defaults to zeros (TRELLIS's).

        Arguments left None take their value from the sampler config (pipeline.json).
        """
        config = SamplerConfig(
            name=self.config.name,
            sigma_min=self.config.sigma_min,
            steps=self.config.steps if steps is None else steps,
            cfg_strength=self.config.cfg_strength if cfg_strength is None else cfg_strength,
            cfg_interval=self.config.cfg_interval if cfg_interval is None else cfg_interval,
            rescale_t=self.config.rescale_t if rescale_t is None else rescale_t,
        )
        if neg_cond is None:
            neg_cond = torch.zeros_like(cond)
        if neg_cond.shape != cond.shape:
            raise ValueError(f"neg_cond {tuple(neg_cond.shape)} must have the shape of cond {tuple(cond.shape)}")
        times = time_schedule(config.steps, config.rescale_t)
        x = noise
        for t, t_prev in zip(times[:-1], times[1:]):
            raise_if_cancelled()
            velocity = guided_velocity(model, x, t, cond, neg_cond, config.cfg_strength, config.cfg_interval)
            x = x - (t - t_prev) * velocity
        logger.debug("sampled %d Euler steps (cfg %.2f in %s)", config.steps, config.cfg_strength, config.cfg_interval)
        return x
