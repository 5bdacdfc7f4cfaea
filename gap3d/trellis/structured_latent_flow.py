"""TRELLIS stage-2 flow transformer: predicts the velocity of the structured latent on sparse voxels.

The noisy latent (8 channels on the stage-1 voxels at 64^3) is lifted by a linear layer, packed by
sparse conv res-blocks that average-pool 2x (64^3 -> 32^3 tokens), given a fixed absolute position
embedding, run through adaLN-modulated blocks with full self-attention over each sample's voxels and
cross-attention to the condition (B, N, cond_channels), then unpacked with skip connections.
Field and module names match the released ckpts/slat_flow_img_dit_L_64l8p2_fp16.json / .safetensors.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gap3d.trellis.sparse as sp
from gap3d.trellis.sampler import FlowEulerSampler
from gap3d.trellis.transformer import LayerNorm32, TimestepEmbedder, absolute_position_embedding


@dataclass
class SLatFlowConfig:
    resolution: int  # side of the voxel grid the latent lives on (64 in the release)
    in_channels: int  # latent channels of the noisy input (8 in the release)
    model_channels: int  # transformer width (1024 in the release)
    cond_channels: int  # feature size of the condition tokens (1024 for DINOv2 ViT-L)
    out_channels: int  # channels of the predicted velocity (= in_channels)
    num_blocks: int  # number of transformer blocks (24 in the release)
    num_heads: int | None = None  # attention heads; None -> model_channels // num_head_channels
    num_head_channels: int = 64  # head width used when num_heads is None
    mlp_ratio: float = 4.0  # MLP hidden size / model_channels
    patch_size: int = 2  # total pooling factor of the input res-blocks (2 in the release)
    num_io_res_blocks: int = 2  # res-blocks per resolution stage on the way in and out
    io_block_channels: list[int] | None = None  # widths of the pooling stages ([128] in the release)
    pe_mode: str = "ape"  # position encoding; only absolute ("ape", the release's) is built
    use_fp16: bool = False  # the release runs its torso in fp16; `set_torso_dtype` chooses the actual dtype
    use_checkpoint: bool = False  # training-time gradient checkpointing in TRELLIS; unused for inference
    use_skip_connection: bool = True  # concatenate input-block features into the output blocks
    share_mod: bool = False  # one adaLN modulation for all blocks; the release uses per-block (False)
    qk_rms_norm: bool = False  # RMS-normalise queries/keys in self-attention (True in the release)
    qk_rms_norm_cross: bool = False  # RMS-normalise queries/keys in cross-attention

    def __post_init__(self):
        if self.pe_mode != "ape":
            raise ValueError(
                f"SLatFlowModel: pe_mode {self.pe_mode!r} is not supported; only 'ape' (the released model's)"
            )
        if self.share_mod:
            raise ValueError(
                "SLatFlowModel: share_mod=True is not supported; the released model uses per-block modulation"
            )
        stages = self.patch_size.bit_length() - 1
        if self.patch_size < 1 or 2**stages != self.patch_size:
            raise ValueError(f"SLatFlowModel: patch_size must be a power of 2, got {self.patch_size}")
        if self.io_block_channels is None and self.patch_size != 1:
            raise ValueError("SLatFlowModel: patch_size > 1 needs io_block_channels (one width per 2x pooling stage)")
        if self.io_block_channels is not None:
            self.io_block_channels = list(self.io_block_channels)
            if len(self.io_block_channels) != stages:
                raise ValueError(
                    f"SLatFlowModel: io_block_channels {self.io_block_channels} must list log2(patch_size) = {stages} "
                    "widths"
                )
            if self.num_io_res_blocks < 1:
                raise ValueError(f"SLatFlowModel: num_io_res_blocks must be >= 1, got {self.num_io_res_blocks}")
        if self.num_heads is None:
            self.num_heads = self.model_channels // self.num_head_channels
        if self.num_heads <= 0 or self.model_channels % self.num_heads:
            raise ValueError(
                f"SLatFlowModel: model_channels {self.model_channels} must be a positive multiple of num_heads "
                f"{self.num_heads}"
            )


class SparseResBlock3d(nn.Module):
    """Timestep-modulated sparse conv res-block, optionally pooling 2x down or unpooling 2x up first."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, downsample: bool = False, upsample: bool = False
    ):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = sp.SparseConv3d(channels, out_channels, 3)
        self.conv2 = sp.SparseConv3d(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = sp.SparseLinear(channels, out_channels) if channels != out_channels else nn.Identity()
        self.updown = sp.SparseDownsample(2) if downsample else sp.SparseUpsample(2) if upsample else None

    def forward(self, x: sp.SparseTensor, emb: torch.Tensor) -> sp.SparseTensor:
        """x feats (M, channels), emb (B, emb_channels) -> feats (M', out_channels)."""
        scale, shift = self.emb_layers(emb).type(x.dtype).chunk(2, dim=1)
        if self.updown is not None:
            x = self.updown(x)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = h.replace(self.norm2(h.feats)) * (1 + scale) + shift
        h = self.conv2(h.replace(F.silu(h.feats)))
        return h + self.skip_connection(x)


class SLatFlowModel(nn.Module):
    config_class = SLatFlowConfig

    def __init__(self, config: SLatFlowConfig):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        width = config.model_channels
        io = config.io_block_channels or []
        self.t_embedder = TimestepEmbedder(width)
        self.input_layer = sp.SparseLinear(config.in_channels, io[0] if io else width)
        self.input_blocks = nn.ModuleList()
        for chs, next_chs in zip(io, io[1:] + [width]):
            self.input_blocks.extend(SparseResBlock3d(chs, width, chs) for _ in range(config.num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, width, next_chs, downsample=True))
        self.blocks = nn.ModuleList(
            sp.ModulatedSparseTransformerCrossBlock(
                width,
                config.cond_channels,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qk_rms_norm=config.qk_rms_norm,
                qk_rms_norm_cross=config.qk_rms_norm_cross,
            )
            for _ in range(config.num_blocks)
        )
        skip = 2 if config.use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        for chs, prev_chs in zip(reversed(io), [width] + list(reversed(io[1:]))):
            self.out_blocks.append(SparseResBlock3d(prev_chs * skip, width, chs, upsample=True))
            self.out_blocks.extend(
                SparseResBlock3d(chs * skip, width, chs) for _ in range(config.num_io_res_blocks - 1)
            )
        self.out_layer = sp.SparseLinear(io[0] if io else width, config.out_channels)
        self.torso_dtype = torch.float32
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: Xavier linears, N(0, 0.02) timestep MLP, zeroed adaLN, second convs and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for block in [*self.input_blocks, *self.out_blocks]:
            nn.init.zeros_(block.conv2.conv.weight)
            nn.init.zeros_(block.conv2.conv.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the res-blocks' and transformer blocks' linear/conv weights in `dtype`; norms stay float32."""
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Linear, sp.SparseConv3d)):
                    module.to(dtype)
        self.torso_dtype = dtype

    def forward(self, x: sp.SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> sp.SparseTensor:
        """x feats (M, in_channels), t (B,) in TRELLIS model time [0, 1000], cond (B, N, cond_channels) -> (M,
        out_channels)."""
        if x.feats.shape[1:] != (self.in_channels,):
            raise ValueError(f"SLat flow input features must be (M, {self.in_channels}), got {tuple(x.feats.shape)}")
        if cond.shape[0] != x.batch_size or t.shape[0] != x.batch_size:
            raise ValueError(
                f"batch mismatch: voxels of {x.batch_size} samples, t {tuple(t.shape)}, cond {tuple(cond.shape)}"
            )
        dtype = self.torso_dtype
        h = self.input_layer(x.type(self.input_layer.weight.dtype)).type(dtype)
        t_emb = self.t_embedder(t).type(dtype)
        cond = cond.type(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        h = h.replace(h.feats + absolute_position_embedding(h.coords[:, 1:], h.feats.shape[1]).type(dtype))
        for block in self.blocks:
            h = block(h, t_emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            if self.config.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))
            h = block(h, t_emb)
        h = h.replace(F.layer_norm(h.feats.float(), h.feats.shape[-1:]))
        return self.out_layer(h.type(self.out_layer.weight.dtype)).type(x.dtype)


def sample_structured_latent(
    model: SLatFlowModel,
    sampler: FlowEulerSampler,
    coords: torch.Tensor,
    cond: torch.Tensor,
    normalization: dict[str, list[float]] | None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    **sampler_overrides,
) -> sp.SparseTensor:
    """Stage 2: noise on voxels `coords` (M, 4) [batch, x, y, z] -> un-normalised structured latent (M, C).

    cond (B, N, cond_channels); the negative condition is zeros (the image release's) unless `neg_cond` is among the
    overrides. `noise` (M, C) is the
    starting point at t=1 (default: drawn from `generator`). `normalization` is pipeline.json's
    slat_normalization {"mean": [C], "std": [C]} (None leaves the latent as sampled).
    `sampler_overrides` (steps, cfg_strength, cfg_interval, rescale_t) override pipeline.json's values; neg_cond
    (B, N, cond_channels) replaces the zeros.
    """
    if coords.shape[0] == 0:
        raise ValueError("stage 2 got no voxels: the sparse structure from stage 1 is empty, nothing to decode")
    parameter = next(model.parameters())
    coords = coords.to(parameter.device).int()
    if noise is None:
        noise_device = parameter.device if generator is None else generator.device
        noise = torch.randn(coords.shape[0], model.in_channels, generator=generator, device=noise_device)
    if noise.shape != (coords.shape[0], model.in_channels):
        raise ValueError(
            f"stage-2 noise must be (M, C) = ({coords.shape[0]}, {model.in_channels}), got {tuple(noise.shape)}"
        )
    latent = sp.SparseTensor(noise.float().to(parameter.device), coords)
    if latent.batch_size != cond.shape[0]:
        raise ValueError(f"coords cover {latent.batch_size} samples but cond has batch {cond.shape[0]}")
    latent = sampler.sample(model, latent, cond.to(parameter.device), **sampler_overrides)
    if normalization is None:
        return latent
    mean = torch.tensor(normalization["mean"], device=latent.device, dtype=latent.dtype)
    std = torch.tensor(normalization["std"], device=latent.device, dtype=latent.dtype)
    if mean.shape != (model.in_channels,) or std.shape != (model.in_channels,):
        raise ValueError(
            f"slat_normalization mean/std must have {model.in_channels} entries, got {tuple(mean.shape)}, "
            f"{tuple(std.shape)}"
        )
    return latent * std + mean
