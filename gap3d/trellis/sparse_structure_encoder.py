"""TRELLIS stage-1 VAE encoder: 64^3 occupancy -> dense 16^3 latent (mean and log-variance).

The mirror of the decoder: input conv, per resolution residual blocks and a stride-2 conv downsampler, middle
residual blocks, then norm / SiLU / conv to 2 x latent_channels (mean, then log-variance). Field and module
names match the `args` and state dict of the released ckpts/ss_enc_conv3d_16l8_fp16.json / .safetensors. TRELLIS
trains its flow on the posterior mean (`sample_posterior=False`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from gap3d.trellis.sparse_structure_decoder import ResBlock3d, norm_layer, zero_residual_branches


@dataclass
class SparseStructureEncoderConfig:
    in_channels: int  # input channels: 1 occupancy value per voxel in the release
    latent_channels: int  # channels of the 16^3 latent (8 in the release)
    num_res_blocks: int  # residual blocks at each resolution (2 in the release)
    channels: list[int]  # width per resolution, fine to coarse; each step halves the side ([32, 128, 512])
    num_res_blocks_middle: int = 2  # residual blocks after the last downsampling
    norm_type: str = "layer"  # norm of the output layer, "layer" (the release) or "group"; blocks use LayerNorm
    use_fp16: bool = False  # the release runs its blocks in fp16; training and the Decoder choose the actual dtype

    def __post_init__(self):
        if not self.channels:
            raise ValueError("SparseStructureEncoder: channels must list at least one width")
        if self.norm_type not in ("layer", "group"):
            raise ValueError(f"SparseStructureEncoder: norm_type must be 'layer' or 'group', got {self.norm_type!r}")
        if self.norm_type == "group" and self.channels[-1] % 32:
            raise ValueError(
                f"SparseStructureEncoder: norm_type 'group' needs a last width divisible by 32, got {self.channels}"
            )

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class DownsampleBlock3d(nn.Module):
    """Stride-2 convolution with a 2x2x2 kernel: halves each spatial side."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SparseStructureEncoder(nn.Module):
    config_class = SparseStructureEncoderConfig

    def __init__(self, config: SparseStructureEncoderConfig):
        super().__init__()
        self.config = config
        channels = config.channels
        self.input_layer = nn.Conv3d(config.in_channels, channels[0], 3, padding=1)
        blocks = []
        for index, width in enumerate(channels):
            blocks.extend(ResBlock3d(width, width) for _ in range(config.num_res_blocks))
            if index < len(channels) - 1:
                blocks.append(DownsampleBlock3d(width, channels[index + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(
            *(ResBlock3d(channels[-1], channels[-1]) for _ in range(config.num_res_blocks_middle))
        )
        self.out_layer = nn.Sequential(
            norm_layer(config.norm_type, channels[-1]),
            nn.SiLU(),
            nn.Conv3d(channels[-1], 2 * config.latent_channels, 3, padding=1),
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        zero_residual_branches(self)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        return_raw: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, in_channels, R, R, R) -> latent (B, latent_channels, R/f, R/f, R/f), f = 2^(len(channels)-1).

        sample_posterior draws mean + exp(logvar / 2) * noise instead of returning the mean; return_raw also
        returns (mean, logvar).
        """
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        mean, logvar = self.out_layer(self.middle_block(h)).chunk(2, dim=1)  # each (B, latent, R/f, R/f, R/f)
        z = mean
        if sample_posterior:
            z = mean + (0.5 * logvar).exp() * torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
        return (z, mean, logvar) if return_raw else z
