"""Training of TRELLIS stage 2 at small size: the structured-latent VAE (encoder and mesh decoder), then the
structured-latent flow on its latents, conditioned on DINOv2 tokens.

The encoder maps each active voxel's features (TRELLIS: DINOv2 features of renders of the object, averaged per voxel)
to the latent's posterior; the mesh decoder turns a latent into FlexiCubes cube features four times finer. TRELLIS
supervises the decoder through differentiable renders of its mesh; here each object's ground truth is known as fields
(signed distance and colour at any point), so the decoder is supervised directly where its mesh is extracted from:
the signed distance and colour at every corner of its fine cubes, deformations and FlexiCubes weights held near
zero (regular cubes). Decoding multiplies the voxels by 64, so the decoder trains on the voxels of a random crop of
each object. The flow is then trained on the normalised posterior means with TRELLIS's objective and time
convention (gap3d.trellis.objectives), as stage 1's is. `Stage2Trainer.add_to_release` writes the three models,
the sampler and the latent normalisation into a stage-1 release directory, which `Decoder.from_pretrained` loads.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gap3d.trellis.sparse as sp
from gap3d.training import EMA
from gap3d.trellis.config import SLAT_DECODER_MESH, SLAT_FLOW, PipelineConfig, SamplerConfig
from gap3d.trellis.loading import ModelSpec, build_model, write_trellis_checkpoint
from gap3d.trellis.mesh_extraction import CUBE_CORNERS
from gap3d.trellis.objectives import diffuse, drop_condition, kl_to_standard_normal, sample_time, velocity_target
from gap3d.trellis.phased_training import PhasedTrainer
from gap3d.trellis.sampler import MODEL_TIME_SCALE

logger = logging.getLogger(__name__)

SLAT_ENCODER = "slat_encoder"  # the release ships it as ckpts/slat_enc_swin8_B_64l8_fp16
SUBDIVISION = 4  # the mesh decoder's cubes per voxel side (two subdivisions)
# An object's ground truth as fields: (object index, points (P, 3) in TRELLIS's frame) -> (signed distance (P,),
# negative inside; colour (3,) in [0, 1] or (P, 3)).
Fields = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Stage2Config:
    resolution: int = 16  # side of the voxel grid stage 2 runs on (64 in the release)
    latent_channels: int = 8  # channels of the structured latent (8 in the release)
    encoder_width: int = 64  # model_channels of the encoder (768 in the release)
    decoder_width: int = 256  # model_channels of the mesh decoder: the smallest its GroupNorm(32) of width / 8 allows
    vae_blocks: int = 2  # transformer blocks of encoder and decoder (12 in the release)
    vae_heads: int = 4  # attention heads of encoder and decoder
    window_size: int = 8  # swin window side in voxels
    vae_steps: int = 1500  # VAE optimiser steps
    vae_batch_size: int = 1  # objects per VAE step (one object's colour is all a step sees at 1)
    vae_lr: float = 3e-4  # AdamW learning rate of the VAE (constant)
    kl_weight: float = 1e-6  # weight of the KL term (TRELLIS's structured-latent VAE)
    crop: int = 8  # the decoder trains on the voxels of a random crop of this side
    sdf_band: float = 3.0  # target distances are clamped to this many fine cubes
    color_weight: float = 1.0  # weight of the corner colours beside the signed distances
    regularization_weight: float = 0.01  # deformations and FlexiCubes weights towards zero
    flow_width: int = 64  # model_channels of the flow (1024 in the release)
    flow_blocks: int = 2  # transformer blocks of the flow (24 in the release)
    flow_heads: int = 4  # attention heads of the flow
    flow_io_channels: int = 32  # width of the flow's sparse conv res-blocks around the 2x pooling
    flow_steps: int = 3000  # flow optimiser steps
    flow_batch_size: int = 8  # objects per flow step
    flow_lr: float = 1e-3  # peak AdamW learning rate of the flow; cosine decay to a tenth over flow_steps
    ema_decay: float = 0.995  # EMA of the flow weights; the release gets the EMA
    p_uncond: float = 0.1  # share of samples trained with the zero (negative) condition
    t_mean: float = 1.0  # logit-normal time distribution: sigmoid(N(t_mean, t_std^2)) (TRELLIS: 1, 1)
    t_std: float = 1.0
    sigma_min: float = 1e-5  # noise floor of the diffusion
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(steps=8, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    )
    seed: int = 0  # initial weights, crops, batches, noise

    def __post_init__(self):
        for name in (
            "resolution",
            "latent_channels",
            "vae_blocks",
            "flow_blocks",
            "crop",
            "vae_batch_size",
            "flow_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"stage2.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_width % 256:
            raise ValueError(
                f"stage2.decoder_width must be a multiple of 256 (GroupNorm(32) of width / 8), got {self.decoder_width}"
            )


def model_specs(config: Stage2Config, feature_channels: int, cond_dim: int) -> dict[str, dict]:
    """{pipeline name: {"name": class, "args": {...}}} of the three stage-2 models."""
    vae = {
        "resolution": config.resolution,
        "latent_channels": config.latent_channels,
        "num_blocks": config.vae_blocks,
        "num_heads": config.vae_heads,
        "mlp_ratio": 2,
        "attn_mode": "swin",
        "window_size": config.window_size,
        "pe_mode": "ape",
        "use_fp16": False,
    }
    flow = {
        "resolution": config.resolution,
        "in_channels": config.latent_channels,
        "out_channels": config.latent_channels,
        "model_channels": config.flow_width,
        "cond_channels": cond_dim,
        "num_blocks": config.flow_blocks,
        "num_heads": config.flow_heads,
        "mlp_ratio": 2,
        "patch_size": 2,
        "num_io_res_blocks": 2,
        "io_block_channels": [config.flow_io_channels],
        "pe_mode": "ape",
        "qk_rms_norm": True,
        "use_fp16": False,
    }
    return {
        SLAT_ENCODER: {
            "name": "SLatEncoder",
            "args": {**vae, "in_channels": feature_channels, "model_channels": config.encoder_width},
        },
        SLAT_DECODER_MESH: {
            "name": "SLatMeshDecoder",
            "args": {**vae, "model_channels": config.decoder_width, "representation_config": {"use_color": True}},
        },
        SLAT_FLOW: {"name": "SLatFlowModel", "args": flow},
    }


def corner_points(cube_coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Fine cubes (M, 3) at `resolution` -> their 8 corners' positions (M, 8, 3) in TRELLIS's frame (the extraction's
    grid vertex v sits at v / resolution - 0.5)."""
    corners = torch.tensor(CUBE_CORNERS, dtype=torch.float32, device=cube_coords.device)
    return (cube_coords[:, None, :].float() + corners) / resolution - 0.5


def decoder_targets(
    features: torch.Tensor, sdf: torch.Tensor, color: torch.Tensor, resolution: int, config: Stage2Config
) -> dict:
    """Loss terms of the decoder's cube features (M, 101) against the true corner distances (M, 8) and colours (M, 8,
    3)."""
    band = config.sdf_band / resolution
    # The extraction reads a corner's distance as feature - 1 / resolution (TRELLIS's bias of one cube outwards).
    target = sdf.clamp(-band, band) + 1.0 / resolution
    predicted_sdf = features[:, :8].clamp(-2 * band, 2 * band)
    colors = features[:, 53:].reshape(-1, 8, 6)[..., :3]
    terms = {
        "sdf": F.l1_loss(predicted_sdf, target) * resolution,  # in fine cubes
        "color": F.mse_loss(colors, color),
        "regularization": features[:, 8:53].pow(2).mean(),
    }
    terms["loss"] = (
        terms["sdf"] + config.color_weight * terms["color"] + config.regularization_weight * terms["regularization"]
    )
    return terms


class Stage2Trainer(PhasedTrainer):
    """Trains the structured-latent VAE, then the flow, on each object's voxels (M_i, 3) at config.resolution, their
    features (M_i, F), condition tokens (N, T, D) and ground-truth fields."""

    stage = "stage 2"

    def __init__(
        self,
        config: Stage2Config,
        voxels: list[torch.Tensor],
        features: list[torch.Tensor],
        cond: torch.Tensor,
        fields: Fields,
    ):
        if not (len(voxels) == len(features) == cond.shape[0]):
            raise ValueError(
                f"need one voxel set, feature set and condition per object, got {len(voxels)}, {len(features)}, "
                f"{cond.shape[0]}"
            )
        self.config, self.voxels, self.features, self.cond, self.fields = config, voxels, features, cond.float(), fields
        torch.manual_seed(config.seed)
        self.specs = model_specs(config, features[0].shape[1], cond.shape[-1])
        self.models = {name: build_model(spec, f"stage-2 spec {name}") for name, spec in self.specs.items()}
        vae_parameters = [*self.models[SLAT_ENCODER].parameters(), *self.models[SLAT_DECODER_MESH].parameters()]
        self.vae_optimizer = torch.optim.AdamW(vae_parameters, lr=config.vae_lr, weight_decay=0.0)
        self.flow_optimizer = torch.optim.AdamW(self.flow.parameters(), lr=config.flow_lr, weight_decay=0.0)
        self.flow_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.flow_optimizer, max(1, config.flow_steps), eta_min=config.flow_lr / 10
        )
        self.ema = EMA(dict(self.flow.named_parameters()), config.ema_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self.latents: list[torch.Tensor] | None = None  # normalised posterior means per object, once the VAE is done
        self.normalization: dict[str, list[float]] | None = None
        self.history: list[dict] = []

    @property
    def flow(self) -> torch.nn.Module:
        return self.models[SLAT_FLOW]

    def _crop(self, index: int) -> torch.Tensor:
        """Rows of object `index`'s voxels inside a crop of side config.crop around a random voxel of it."""
        voxels = self.voxels[index]
        centre = voxels[self.rng.integers(len(voxels))]
        low = centre - self.config.crop // 2
        return torch.nonzero(((voxels >= low) & (voxels < low + self.config.crop)).all(dim=1))[:, 0]

    def vae_step(self) -> dict[str, torch.Tensor]:
        """A batch of objects: encode every voxel, decode a crop's, supervise the fine cubes' corners with the
        objects' fields."""
        config = self.config
        batch = self.rng.integers(len(self.voxels), size=config.vae_batch_size).tolist()
        coords = torch.cat([F.pad(self.voxels[i].int(), (1, 0), value=row) for row, i in enumerate(batch)])
        features = torch.cat([self.features[i].float() for i in batch])
        mean, logvar = self.models[SLAT_ENCODER](sp.SparseTensor(features, coords))
        latent = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=self.generator)
        offsets = np.cumsum([0] + [len(self.voxels[i]) for i in batch])
        rows = torch.cat([offsets[row] + self._crop(i) for row, i in enumerate(batch)])
        cubes = self.models[SLAT_DECODER_MESH](sp.SparseTensor(latent[rows], coords[rows]))
        sdf, color = self._corner_targets(batch, cubes.coords)
        terms = decoder_targets(cubes.feats, sdf, color, SUBDIVISION * config.resolution, config)
        terms["kl"] = kl_to_standard_normal(mean, logvar)
        terms["loss"] = terms["loss"] + config.kl_weight * terms["kl"]
        return terms

    def _corner_targets(self, batch: list[int], cube_coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """True signed distances (M, 8) and colours (M, 8, 3) at the corners of fine cubes (M, 4) [row, x, y, z], each
        cube's from the fields of the object `batch[row]`."""
        points = corner_points(cube_coords[:, 1:], SUBDIVISION * self.config.resolution)  # (M, 8, 3)
        sdf, color = torch.empty(points.shape[:2]), torch.empty(points.shape)
        for row, index in enumerate(batch):
            mine = cube_coords[:, 0] == row
            distance, rgb = self.fields(index, points[mine].reshape(-1, 3).numpy())
            sdf[mine] = torch.as_tensor(distance, dtype=torch.float32).reshape(-1, 8)
            color[mine] = torch.as_tensor(rgb, dtype=torch.float32).expand(len(distance), 3).reshape(-1, 8, 3)
        return sdf, color

    def flow_step(self) -> dict[str, torch.Tensor]:
        """A batch of objects' normalised latents through TRELLIS's flow objective on their voxels."""
        config = self.config
        if self.latents is None:
            self._finish_vae()
        batch = torch.randint(len(self.latents), (config.flow_batch_size,), generator=self.generator).tolist()
        coords = torch.cat([F.pad(self.voxels[i].int(), (1, 0), value=row) for row, i in enumerate(batch)])
        x0 = torch.cat([self.latents[i] for i in batch])
        noise = torch.randn(x0.shape, generator=self.generator)
        t = sample_time(len(batch), config.t_mean, config.t_std, self.generator)
        per_voxel = t[coords[:, 0].long()]
        cond = drop_condition(self.cond[batch], config.p_uncond, self.generator)
        noisy = sp.SparseTensor(diffuse(x0, noise, per_voxel, config.sigma_min), coords)
        prediction = self.flow(noisy, t * MODEL_TIME_SCALE, cond)
        loss = F.mse_loss(prediction.feats, velocity_target(x0, noise, config.sigma_min))
        return {"loss": loss, "flow": loss}

    @torch.no_grad()
    def encode(self, index: int) -> torch.Tensor:
        """Posterior mean (M_i, C) of object `index`'s latent (what the flow is trained on, before normalising)."""
        coords = F.pad(self.voxels[index].int(), (1, 0))
        return self.models[SLAT_ENCODER](sp.SparseTensor(self.features[index].float(), coords))[0]

    @torch.no_grad()
    def _finish_vae(self) -> None:
        """Encode every object and normalise the latents per channel (pipeline.json's slat_normalization)."""
        means = [self.encode(i) for i in range(len(self.voxels))]
        stacked = torch.cat(means)
        mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
        self.normalization = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
        self.latents = [(m - mean) / std for m in means]
        logger.info(
            "stage 2: %d objects encoded; latent mean %s std %s",
            len(means),
            self.normalization["mean"],
            self.normalization["std"],
        )

    def flow_for_release(self) -> torch.nn.Module:
        """The flow with its EMA weights (what the release ships)."""
        flow = build_model(self.specs[SLAT_FLOW], "stage-2 flow")
        flow.load_state_dict({**self.flow.state_dict(), **self.ema.state_dict()})
        return flow.eval()

    def add_to_release(self, root: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the stage-2 models, sampler and latent normalisation into the stage-1 release at `root`."""
        stems = {
            SLAT_ENCODER: "ckpts/slat_enc_swin_trained",
            SLAT_DECODER_MESH: "ckpts/slat_dec_mesh_swin_trained",
            SLAT_FLOW: "ckpts/slat_flow_img_dit_trained",
        }
        specs = {name: ModelSpec(stems[name], spec["name"], spec["args"]) for name, spec in self.specs.items()}
        models = {**self.models, SLAT_FLOW: self.flow_for_release()}
        pipeline = PipelineConfig.load(Path(root))
        pipeline.models.update({name: spec.stem for name, spec in specs.items()})
        pipeline.slat_sampler = self.config.sampler
        pipeline.slat_normalization = self.normalization
        write_trellis_checkpoint(root, specs, models, pipeline, dtype)
        logger.info("stage 2 written into %s", root)
        return Path(root)
