"""TRELLIS stage-1 flow transformer: predicts the velocity of the dense 16^3 sparse-structure latent.

The latent grid is patchified into tokens (4096 at patch size 1), given a fixed absolute position
embedding, and run through adaLN-modulated blocks that cross-attend to the image condition
(B, N, cond_channels); N is 1374 DINOv2 tokens for the release, any N works.
Field names match the `args` of the released ckpts/ss_flow_img_dit_L_16l8_fp16.json.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gap3d.trellis.transformer import ModulatedTransformerCrossBlock, TimestepEmbedder, absolute_position_embedding


@dataclass
class SparseStructureFlowConfig:
    resolution: int  # side of the dense latent grid (16 in the release)
    in_channels: int  # latent channels of the noisy input (8 in the release)
    model_channels: int  # transformer width (1024 in the release)
    cond_channels: int  # feature size of the condition tokens (1024 for DINOv2 ViT-L)
    out_channels: int  # channels of the predicted velocity (= in_channels)
    num_blocks: int  # number of transformer blocks (24 in the release)
    num_heads: int | None = None  # attention heads; None -> model_channels // num_head_channels
    num_head_channels: int = 64  # head width used when num_heads is None
    mlp_ratio: float = 4.0  # MLP hidden size / model_channels
    patch_size: int = 2  # side of the cubic patch folded into one token (1 in the release)
    pe_mode: str = "ape"  # position encoding; the release uses absolute ("ape"), the only one built here
    use_fp16: bool = False  # the release runs its blocks in fp16; the Decoder chooses the actual dtype
    use_checkpoint: bool = False  # training-time gradient checkpointing in TRELLIS; unused for inference
    share_mod: bool = False  # one adaLN modulation for all blocks; the release uses per-block (False)
    qk_rms_norm: bool = False  # RMS-normalise queries/keys in self-attention (True in the release)
    qk_rms_norm_cross: bool = False  # RMS-normalise queries/keys in cross-attention

    def __post_init__(self):
        if self.pe_mode != "ape":
            raise ValueError(
                f"SparseStructureFlowModel: pe_mode {self.pe_mode!r} is not supported; only 'ape' (the released "
                "model's)"
            )
        if self.share_mod:
            raise ValueError(
                "SparseStructureFlowModel: share_mod=True is not supported; the released model uses per-block "
                "modulation"
            )
        if self.resolution % self.patch_size:
            raise ValueError(
                f"SparseStructureFlowModel: resolution {self.resolution} is not divisible by patch_size "
                f"{self.patch_size}"
            )
        if self.num_heads is None:
            self.num_heads = self.model_channels // self.num_head_channels
        if self.num_heads <= 0 or self.model_channels % self.num_heads:
            raise ValueError(
                f"SparseStructureFlowModel: model_channels {self.model_channels} must be a positive multiple of "
                f"num_heads {self.num_heads}"
            )


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, R, R, R) -> (B, C * p^3, R/p, R/p, R/p), channel index = c * p^3 + offset inside the patch."""
    batch, channels, *spatial = x.shape
    grid = [size // patch_size for size in spatial]
    x = x.reshape(batch, channels, grid[0], patch_size, grid[1], patch_size, grid[2], patch_size)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(batch, channels * patch_size**3, *grid)


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, C * p^3, G, G, G) -> (B, C, G*p, G*p, G*p)."""
    batch, folded, *grid = x.shape
    channels = folded // patch_size**3
    x = x.reshape(batch, channels, patch_size, patch_size, patch_size, *grid)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(batch, channels, *(size * patch_size for size in grid))


class SparseStructureFlowModel(nn.Module):
    config_class = SparseStructureFlowConfig

    def __init__(self, config: SparseStructureFlowConfig):
        super().__init__()
        self.config = config
        self.resolution = config.resolution
        self.in_channels = config.in_channels
        width = config.model_channels
        grid = config.resolution // config.patch_size
        self.t_embedder = TimestepEmbedder(width)
        axes = torch.arange(grid)
        coords = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), dim=-1).reshape(-1, 3)
        # Persistent, as in TRELLIS: the released state dict carries it.
        self.register_buffer("pos_emb", absolute_position_embedding(coords, width))  # (G^3, width)
        self.input_layer = nn.Linear(config.in_channels * config.patch_size**3, width)
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(
                width,
                config.cond_channels,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qk_rms_norm=config.qk_rms_norm,
                qk_rms_norm_cross=config.qk_rms_norm_cross,
            )
            for _ in range(config.num_blocks)
        )
        self.out_layer = nn.Linear(width, config.out_channels * config.patch_size**3)
        self.torso_dtype = torch.float32
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: Xavier linears, N(0, 0.02) timestep MLP, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the blocks' linear layers in `dtype` (fp16/bf16 on GPU); norms and I/O layers stay float32."""
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        self.torso_dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C, R, R, R), t (B,) in TRELLIS model time [0, 1000], cond (B, N, cond_channels) -> (B, C, R, R, R)."""
        expected = (self.in_channels, self.resolution, self.resolution, self.resolution)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"sparse-structure flow input must be (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        patch = self.config.patch_size
        h = patchify(x, patch).flatten(2).transpose(1, 2)  # (B, G^3, C * p^3)
        h = self.input_layer(h.to(self.input_layer.weight.dtype)) + self.pos_emb[None]
        dtype = self.torso_dtype
        t_emb = self.t_embedder(t).to(dtype)
        h, cond = h.to(dtype), cond.to(dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        h = F.layer_norm(h.float(), h.shape[-1:])
        h = self.out_layer(h.to(self.out_layer.weight.dtype))  # (B, G^3, C_out * p^3)
        grid = self.resolution // patch
        h = h.transpose(1, 2).reshape(h.shape[0], -1, grid, grid, grid)
        return unpatchify(h, patch).to(x.dtype)
