"""TRELLIS structured-latent encoder: per-voxel features -> the structured latent's posterior on the same voxels.

A sparse transformer (linear in, absolute position embedding, self-attention blocks; the release uses shifted 8^3
windows, "swin"), a non-affine layer norm and a linear layer to the posterior's mean and log-variance. TRELLIS feeds
it each active voxel's DINOv2 features averaged over renders of the object; it is what training uses to make the
latents the flow then learns to generate. Field and module names match the released
ckpts/slat_enc_swin8_B_64l8_fp16.json / .safetensors.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gap3d.trellis.sparse as sp
from gap3d.trellis.structured_latent_decoder import ATTN_MODES, swin_blocks
from gap3d.trellis.transformer import absolute_position_embedding


@dataclass
class SLatEncoderConfig:
    resolution: int  # side of the voxel grid (64 in the release)
    in_channels: int  # per-voxel feature size (1024: DINOv2 ViT-L's in the release)
    model_channels: int  # transformer width (768 in the release)
    latent_channels: int  # structured-latent channels (8 in the release)
    num_blocks: int  # number of transformer blocks (12 in the release)
    num_heads: int | None = None  # attention heads; None -> model_channels // num_head_channels
    num_head_channels: int = 64  # head width used when num_heads is None
    mlp_ratio: float = 4.0  # MLP hidden size / model_channels
    attn_mode: str = "swin"  # "swin": 3-D windows shifted by half a window every other block; or "full"
    window_size: int = 8  # window side in voxels for "swin"
    pe_mode: str = "ape"  # position encoding; only absolute ("ape", the release's) is built
    use_fp16: bool = False  # the release runs its torso in fp16; `set_torso_dtype` chooses the actual dtype
    use_checkpoint: bool = False  # training-time gradient checkpointing in TRELLIS; unused here
    qk_rms_norm: bool = False  # RMS-normalise queries/keys in self-attention

    def __post_init__(self):
        if self.pe_mode != "ape":
            raise ValueError(
                f"SLatEncoder: pe_mode {self.pe_mode!r} is not supported; only 'ape' (the released model's)"
            )
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f"SLatEncoder: attn_mode {self.attn_mode!r} is not supported; use one of {ATTN_MODES}")
        if self.num_heads is None:
            self.num_heads = self.model_channels // self.num_head_channels
        if self.num_heads <= 0 or self.model_channels % self.num_heads:
            raise ValueError(
                f"SLatEncoder: model_channels {self.model_channels} must be a positive multiple of num_heads "
                f"{self.num_heads}"
            )


class SLatEncoder(nn.Module):
    config_class = SLatEncoderConfig

    def __init__(self, config: SLatEncoderConfig):
        super().__init__()
        self.config = config
        width = config.model_channels
        self.input_layer = sp.SparseLinear(config.in_channels, width)
        self.blocks = swin_blocks(width, config)
        self.out_layer = sp.SparseLinear(width, 2 * config.latent_channels)
        self.torso_dtype = torch.float32
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears and a zeroed output layer (TRELLIS's init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the transformer blocks' linear weights in `dtype`; norms stay float32."""
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        self.torso_dtype = dtype

    def forward(self, x: sp.SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel features (M, in_channels) -> the posterior's mean and log-variance, each (M, latent_channels)."""
        if x.feats.shape[1:] != (self.config.in_channels,):
            raise ValueError(
                f"SLat encoder input features must be (M, {self.config.in_channels}), got {tuple(x.feats.shape)}"
            )
        h = self.input_layer(x.type(self.input_layer.weight.dtype))
        h = h.replace(h.feats + absolute_position_embedding(x.coords[:, 1:], h.feats.shape[1]))
        h = h.type(self.torso_dtype)
        for block in self.blocks:
            h = block(h)
        h = self.out_layer(h.replace(F.layer_norm(h.feats.float(), h.feats.shape[-1:])))
        mean, logvar = h.feats.chunk(2, dim=-1)
        return mean, logvar
