"""TRELLIS stage-1 training objectives: the sparse-structure VAE loss and the flow-matching loss.

Time convention (the one the released weights were trained with, and the one gap3d.trellis.sampler
integrates): t=0 is data, t=1 is noise,

    x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) noise,    v = dx_t/dt = (1 - sigma_min) noise - x0,

t is drawn logit-normal (sigmoid of N(mean, std); TRELLIS's stage-1 flow uses mean 1, std 1, which puts
more steps near noise) and fed to the network as t * 1000. With probability p_uncond a sample's condition
is replaced by zeros, the negative condition classifier-free guidance uses at sampling time.
The VAE is trained on surface occupancy with binary cross-entropy plus Dice, and a KL term to N(0, I).
"""

import torch
import torch.nn.functional as F

from gap3d.trellis.sampler import MODEL_TIME_SCALE


def diffuse(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """x_t for x0, noise (B, ...) and t (B,) in [0, 1]."""
    t = t.view(-1, *[1] * (x0.ndim - 1))
    return (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """d x_t / dt: the velocity the flow network is trained to predict. Same shape as x0."""
    return (1 - sigma_min) * noise - x0


def sample_time(batch_size: int, mean: float, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) times drawn logit-normal: sigmoid(N(mean, std^2))."""
    return torch.sigmoid(torch.randn(batch_size, generator=generator) * std + mean)


def drop_condition(cond: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """cond (B, N, D) with each sample's tokens zeroed with probability p_uncond (TRELLIS's negative condition)."""
    keep = torch.rand(cond.shape[0], generator=generator) >= p_uncond
    return cond * keep.to(cond.dtype).view(-1, 1, 1)


def flow_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator,
    sigma_min: float = 1e-5,
    t_mean: float = 1.0,
    t_std: float = 1.0,
    p_uncond: float = 0.1,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity. x0 (B, C, R, R, R) latents, cond (B, N, D) tokens."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = sample_time(x0.shape[0], t_mean, t_std, generator).to(x0)
    cond = drop_condition(cond, p_uncond, generator).to(x0)
    prediction = model(diffuse(x0, noise, t, sigma_min), t * MODEL_TIME_SCALE, cond)
    return F.mse_loss(prediction, velocity_target(x0, noise, sigma_min))


def dice_loss(logits: torch.Tensor, occupancy: torch.Tensor) -> torch.Tensor:
    """1 - Dice overlap of sigmoid(logits) with the occupancy, over the whole batch (TRELLIS's smoothing of 1)."""
    probability = torch.sigmoid(logits)
    return 1 - (2 * (probability * occupancy).sum() + 1) / (probability.sum() + occupancy.sum() + 1)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over elements as TRELLIS does."""
    return 0.5 * torch.mean(mean.pow(2) + logvar.exp() - logvar - 1)


def vae_loss(
    encoder: torch.nn.Module,
    decoder: torch.nn.Module,
    occupancy: torch.Tensor,
    generator: torch.Generator,
    kl_weight: float = 1e-3,
    dice_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """{"loss", "bce", "dice", "kl"} for occupancy (B, 1, R, R, R) in {0, 1}; the latent is a posterior sample."""
    z, mean, logvar = encoder(occupancy, sample_posterior=True, return_raw=True, generator=generator)
    logits = decoder(z)  # (B, 1, R, R, R)
    terms = {
        "bce": F.binary_cross_entropy_with_logits(logits, occupancy),
        "dice": dice_loss(logits, occupancy),
        "kl": kl_to_standard_normal(mean, logvar),
    }
    terms["loss"] = terms["bce"] + dice_weight * terms["dice"] + kl_weight * terms["kl"]
    return terms
