"""TRELLIS stage-1 VAE decoder: dense 16^3 latent -> 64^3 occupancy logits.

A 3-D conv net: input conv, middle residual blocks, then per resolution residual blocks and a
conv + 3-D pixel-shuffle upsampler, then norm / SiLU / conv to one logit per voxel. Field names
match the `args` of the released ckpts/ss_dec_conv3d_16l8_fp16.json.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gap3d.trellis.transformer import LayerNorm32


@dataclass
class SparseStructureDecoderConfig:
    out_channels: int  # output channels: 1 occupancy logit per voxel in the release
    latent_channels: int  # channels of the 16^3 latent (8 in the release)
    num_res_blocks: int  # residual blocks at each resolution (2 in the release)
    channels: list[int]  # width per resolution, coarse to fine; each step doubles the side ([512, 128, 32])
    num_res_blocks_middle: int = 2  # residual blocks before the first upsampling
    # Norm of the output layer: "layer" (channel LayerNorm, the release) or "group" (GroupNorm, 32 groups). The residual
    # blocks use LayerNorm either way, as TRELLIS's own classes do.
    norm_type: str = "layer"
    use_fp16: bool = False  # the release runs its blocks in fp16; the Decoder chooses the actual dtype

    def __post_init__(self):
        if not self.channels:
            raise ValueError("SparseStructureDecoder: channels must list at least one width")
        if self.norm_type not in ("layer", "group"):
            raise ValueError(f"SparseStructureDecoder: norm_type must be 'layer' or 'group', got {self.norm_type!r}")
        if self.norm_type == "group" and self.channels[-1] % 32:
            raise ValueError(
                f"SparseStructureDecoder: norm_type 'group' needs a last width divisible by 32, got {self.channels}"
            )

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel dim of (B, C, *spatial), computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1).contiguous()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    return ChannelLayerNorm32(channels) if norm_type == "layer" else GroupNorm32(32, channels)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C * f^3, D, H, W) -> (B, C, D*f, H*f, W*f), channel index = c * f^3 + offset inside the cell."""
    batch, folded, *spatial = x.shape
    channels = folded // factor**3
    x = x.reshape(batch, channels, factor, factor, factor, *spatial)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(batch, channels, *(size * factor for size in spatial))


class ResBlock3d(nn.Module):
    """norm -> SiLU -> conv, twice, plus a skip (1x1x1 conv when the width changes). The norms are channel LayerNorms
    whatever the VAE's norm_type: TRELLIS builds its residual blocks with their default, not the VAE's argument."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm32(channels)
        self.norm2 = ChannelLayerNorm32(out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


def zero_residual_branches(model: nn.Module) -> None:
    """TRELLIS init for its conv3d VAE: PyTorch defaults, with each residual block's second conv zeroed."""
    for module in model.modules():
        if isinstance(module, ResBlock3d):
            nn.init.zeros_(module.conv2.weight)
            nn.init.zeros_(module.conv2.bias)


class UpsampleBlock3d(nn.Module):
    """Conv to 8x the output width, then 3-D pixel shuffle: doubles each spatial side."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    config_class = SparseStructureDecoderConfig

    def __init__(self, config: SparseStructureDecoderConfig):
        super().__init__()
        self.config = config
        channels = config.channels
        self.input_layer = nn.Conv3d(config.latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(
            *(ResBlock3d(channels[0], channels[0]) for _ in range(config.num_res_blocks_middle))
        )
        blocks = []
        for index, width in enumerate(channels):
            blocks.extend(ResBlock3d(width, width) for _ in range(config.num_res_blocks))
            if index < len(channels) - 1:
                blocks.append(UpsampleBlock3d(width, channels[index + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(
            norm_layer(config.norm_type, channels[-1]),
            nn.SiLU(),
            nn.Conv3d(channels[-1], config.out_channels, 3, padding=1),
        )
        self.torso_dtype = torch.float32
        self.initialize_weights()

    def initialize_weights(self) -> None:
        zero_residual_branches(self)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the middle and upsampling blocks' convs in `dtype`; norms and I/O convs stay float32."""
        for module in [*self.middle_block.modules(), *self.blocks.modules()]:
            if isinstance(module, nn.Conv3d):
                module.to(dtype)
        self.torso_dtype = dtype

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, R, R, R) -> (B, out_channels, R*f, R*f, R*f) logits, f = 2^(len(channels)-1)."""
        h = self.input_layer(z.to(self.input_layer.weight.dtype))
        h = self.middle_block(h.to(self.torso_dtype))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(self.out_layer[-1].weight.dtype)).to(z.dtype)
