"""Training of TRELLIS stage 1 at small size: the sparse-structure VAE on occupancy grids, then the
sparse-structure flow on its latents, conditioned on DINOv2 tokens (objectives in gap3d.trellis.objectives).

The models are the release's classes built from {"name", "args"} specs, so `write_release` produces a
directory `Decoder.from_pretrained` loads unchanged. After the VAE phase the latent is rescaled to unit
standard deviation by folding a scale into the encoder's output and the decoder's input convolution: the
flow then sees data and noise of the same size (TRELLIS's stage-1 latent is not normalised separately),
and the decoder still takes what the flow produces. `Stage1Trainer.state_dict` holds everything a resumed
run needs (weights, optimiser, EMA, generator, step), so a run cut anywhere continues exactly.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gap3d.training import EMA
from gap3d.trellis.config import (
    OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
    SPARSE_STRUCTURE_DECODER,
    SPARSE_STRUCTURE_FLOW,
    PipelineConfig,
    SamplerConfig,
)
from gap3d.trellis.loading import ModelSpec, build_model, write_trellis_checkpoint
from gap3d.trellis.objectives import flow_loss, vae_loss
from gap3d.trellis.phased_training import PhasedTrainer

logger = logging.getLogger(__name__)

SPARSE_STRUCTURE_ENCODER = "sparse_structure_encoder"  # the release ships it as ckpts/ss_enc_conv3d_16l8_fp16


@dataclass
class Stage1Config:
    resolution: int = 32  # side of the occupancy grid the decoder outputs (64 in the release)
    latent_channels: int = 8  # channels of the latent (8 in the release)
    vae_channels: list[int] = field(
        default_factory=lambda: [8, 16, 32]
    )  # encoder widths, fine to coarse; the decoder's reversed
    flow_width: int = 128  # model_channels of the flow transformer (1024 in the release)
    flow_blocks: int = 4  # transformer blocks (24 in the release)
    flow_heads: int = 4  # attention heads
    patch_size: int = 2  # latent cells per token side (1 in the release)
    vae_steps: int = 200  # VAE optimiser steps
    vae_batch_size: int = 8  # occupancy grids per VAE step
    vae_lr: float = 5e-4  # AdamW learning rate of the VAE (constant)
    kl_weight: float = 1e-3  # weight of the KL term (TRELLIS's lambda_kl)
    initial_logvar: float = (
        -6.0
    )  # posterior log-variance at init: at 0, the sampled noise hides the input from the decoder for hundreds of steps
    dice_weight: float = 1.0  # weight of the Dice term beside binary cross-entropy
    flow_steps: int = 1500  # flow optimiser steps
    flow_batch_size: int = 32  # latents per flow step
    flow_lr: float = 1e-3  # peak AdamW learning rate of the flow; cosine decay to a tenth over flow_steps
    ema_decay: float = 0.995  # EMA of the flow weights; the release gets the EMA
    p_uncond: float = 0.1  # share of samples trained with the zero (negative) condition
    t_mean: float = 1.0  # logit-normal time distribution: sigmoid(N(t_mean, t_std^2)) (TRELLIS: 1, 1)
    t_std: float = 1.0
    sigma_min: float = 1e-5  # noise floor of the diffusion
    # Written to pipeline.json. 12 steps, as TRELLIS's example runs its stage 1: the tiny release decodes the held-out
    # objects as at 25 steps in half the time (docs/miniature.md).
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(steps=12, cfg_strength=3.0, cfg_interval=(0.0, 1.0), rescale_t=3.0)
    )
    seed: int = 0  # initial weights, batches, noise

    def __post_init__(self):
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.resolution % factor or (self.resolution // factor) % self.patch_size:
            raise ValueError(
                f"resolution {self.resolution} must divide by 2^(len(vae_channels)-1) = {factor}, and the latent side "
                f"by patch_size {self.patch_size}"
            )
        for name in ("vae_steps", "vae_batch_size", "flow_steps", "flow_batch_size"):
            if getattr(self, name) < 0 or (name.endswith("batch_size") and getattr(self, name) < 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")

    @property
    def latent_resolution(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def model_specs(config: Stage1Config, cond_dim: int) -> dict[str, dict]:
    """{pipeline name: {"name": class, "args": {...}}} of the three stage-1 models."""
    vae = {
        "latent_channels": config.latent_channels,
        "num_res_blocks": 1,
        "num_res_blocks_middle": 1,
        "use_fp16": False,
    }
    flow = {
        **OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
        "resolution": config.latent_resolution,
        "in_channels": config.latent_channels,
        "out_channels": config.latent_channels,
        "model_channels": config.flow_width,
        "cond_channels": cond_dim,
        "num_blocks": config.flow_blocks,
        "num_heads": config.flow_heads,
        "mlp_ratio": 4,
        "patch_size": config.patch_size,
        "use_fp16": False,
    }
    return {
        SPARSE_STRUCTURE_ENCODER: {
            "name": "SparseStructureEncoder",
            "args": {**vae, "in_channels": 1, "channels": list(config.vae_channels)},
        },
        SPARSE_STRUCTURE_DECODER: {
            "name": "SparseStructureDecoder",
            "args": {**vae, "out_channels": 1, "channels": list(reversed(config.vae_channels))},
        },
        SPARSE_STRUCTURE_FLOW: {"name": "SparseStructureFlowModel", "args": flow},
    }


class Stage1Trainer(PhasedTrainer):
    """Trains the VAE, then the flow, on occupancy (N, R, R, R) bool and condition tokens (N, T, D)."""

    stage = "stage 1"

    def __init__(self, config: Stage1Config, occupancy: torch.Tensor, cond: torch.Tensor):
        if occupancy.ndim != 4 or occupancy.shape[1:] != (config.resolution,) * 3:
            raise ValueError(
                f"occupancy must be (N, {config.resolution}, {config.resolution}, {config.resolution}), got "
                f"{tuple(occupancy.shape)}"
            )
        if cond.ndim != 3 or cond.shape[0] != occupancy.shape[0]:
            raise ValueError(
                f"cond must be (N, T, D) with N = {occupancy.shape[0]} occupancy grids, got {tuple(cond.shape)}"
            )
        self.config = config
        self.occupancy = occupancy.bool()
        self.cond = cond.float()
        torch.manual_seed(config.seed)  # initial weights
        self.specs = model_specs(config, cond.shape[-1])
        self.models = {name: build_model(spec, f"stage-1 spec {name}") for name, spec in self.specs.items()}
        with torch.no_grad():
            self.encoder.out_layer[-1].bias[config.latent_channels :] = config.initial_logvar
        vae_parameters = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.vae_optimizer = torch.optim.AdamW(vae_parameters, lr=config.vae_lr, weight_decay=0.0)
        self.flow_optimizer = torch.optim.AdamW(self.flow.parameters(), lr=config.flow_lr, weight_decay=0.0)
        # A tenth at the end: the last steps refine the structures' placement instead of jumping around it.
        self.flow_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.flow_optimizer, max(1, config.flow_steps), eta_min=config.flow_lr / 10
        )
        self.ema = EMA(dict(self.flow.named_parameters()), config.ema_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0  # VAE steps, then flow steps: vae_steps + flow_steps in all
        self.latents: torch.Tensor | None = None  # (N, C, r, r, r) posterior means, once the VAE is done
        self.history: list[dict] = []

    @property
    def encoder(self) -> torch.nn.Module:
        return self.models[SPARSE_STRUCTURE_ENCODER]

    @property
    def decoder(self) -> torch.nn.Module:
        return self.models[SPARSE_STRUCTURE_DECODER]

    @property
    def flow(self) -> torch.nn.Module:
        return self.models[SPARSE_STRUCTURE_FLOW]

    def _batch(self, size: int) -> torch.Tensor:
        return torch.randint(self.occupancy.shape[0], (size,), generator=self.generator)

    def vae_step(self) -> dict[str, torch.Tensor]:
        """A batch of occupancy grids through the VAE's reconstruction and KL terms."""
        config = self.config
        index = self._batch(config.vae_batch_size)
        return vae_loss(
            self.encoder,
            self.decoder,
            self.occupancy[index, None].float(),
            self.generator,
            config.kl_weight,
            config.dice_weight,
        )

    def flow_step(self) -> dict[str, torch.Tensor]:
        """A batch of latents through TRELLIS's flow objective, conditioned on their tokens."""
        config = self.config
        if self.latents is None:
            self._finish_vae()
        index = self._batch(config.flow_batch_size)
        loss = flow_loss(
            self.flow,
            self.latents[index],
            self.cond[index],
            self.generator,
            config.sigma_min,
            config.t_mean,
            config.t_std,
            config.p_uncond,
        )
        return {"flow": loss, "loss": loss}

    @torch.no_grad()
    def encode(self, occupancy: torch.Tensor) -> torch.Tensor:
        """bool (B, R, R, R) -> posterior-mean latents (B, C, r, r, r) (what the flow is trained on)."""
        return torch.cat([self.encoder(chunk[:, None].float()) for chunk in occupancy.split(64)])

    @torch.no_grad()
    def _finish_vae(self) -> None:
        """Rescale the latent to unit std inside the two convs that touch it, then encode every grid."""
        latents = self.encode(self.occupancy)
        scale = latents.std().clamp_min(1e-6)
        mean_conv, channels = self.encoder.out_layer[-1], self.config.latent_channels
        mean_conv.weight[:channels] /= scale
        mean_conv.bias[:channels] /= scale
        mean_conv.bias[channels:] -= 2 * torch.log(scale)  # log-variance follows the mean's scale
        self.decoder.input_layer.weight *= scale
        self.latents = latents / scale
        logger.info(
            "stage 1: VAE latent std %.4f folded into encoder and decoder; latents %s",
            float(scale),
            tuple(self.latents.shape),
        )

    def flow_for_release(self) -> torch.nn.Module:
        """The flow with its EMA weights (what the release ships)."""
        spec = self.specs[SPARSE_STRUCTURE_FLOW]
        flow = build_model(spec, "stage-1 flow")
        flow.load_state_dict({**self.flow.state_dict(), **self.ema.state_dict()})
        return flow.eval()

    def write_release(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """A TRELLIS release directory (pipeline.json + ckpts/) with the trained stage 1, its floating-point weights
        stored in `dtype` (as trained when None; the release stores float16)."""
        stems = {
            SPARSE_STRUCTURE_ENCODER: "ckpts/ss_enc_conv3d_trained",
            SPARSE_STRUCTURE_DECODER: "ckpts/ss_dec_conv3d_trained",
            SPARSE_STRUCTURE_FLOW: "ckpts/ss_flow_img_dit_trained",
        }
        specs = {name: ModelSpec(stems[name], spec["name"], spec["args"]) for name, spec in self.specs.items()}
        models = {
            SPARSE_STRUCTURE_ENCODER: self.encoder,
            SPARSE_STRUCTURE_DECODER: self.decoder,
            SPARSE_STRUCTURE_FLOW: self.flow_for_release(),
        }
        pipeline = PipelineConfig(
            models={name: spec.stem for name, spec in specs.items()}, sparse_structure_sampler=self.config.sampler
        )
        return write_trellis_checkpoint(out_dir, specs, models, pipeline, dtype)

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "step": self.step,
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "vae_optimizer": self.vae_optimizer.state_dict(),
            "flow_optimizer": self.flow_optimizer.state_dict(),
            "flow_schedule": self.flow_schedule.state_dict(),
            "ema": self.ema.state_dict(),
            "generator": self.generator.get_state(),
            "latents": self.latents,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a run saved by state_dict() (same config and data)."""
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.flow_optimizer.load_state_dict(state["flow_optimizer"])
        self.flow_schedule.load_state_dict(state["flow_schedule"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.step, self.latents, self.history = state["step"], state["latents"], list(state["history"])
