"""TRELLIS structured-latent mesh decoder: latent on 64^3 voxels -> per-cube mesh fields at 256^3 -> mesh.

A sparse transformer (linear in, absolute position embedding, self-attention blocks; the release
uses shifted 8^3 windows, "swin") over the latent voxels, then two blocks that each subdivide every
voxel into 8 and refine with sparse convs (64^3 -> 128^3 -> 256^3), then a linear layer to the
FlexiCubes cube features extracted by `gap3d.trellis.mesh_extraction`.
Field and module names match the released ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16.json / .safetensors.
"""

from dataclasses import dataclass, field

import torch
import trimesh
from torch import nn

import gap3d.trellis.sparse as sp
from gap3d.trellis.mesh_extraction import cube_feature_channels, extract_mesh
from gap3d.trellis.transformer import absolute_position_embedding

# Group count of the subdivision blocks' GroupNorms (fixed in TRELLIS).
NUM_GROUPS = 32
ATTN_MODES = ("full", "swin")


@dataclass
class SLatMeshDecoderConfig:
    resolution: int  # side of the latent voxel grid (64 in the release); meshes are extracted at 4x this
    model_channels: int  # transformer width (768 in the release); must be a multiple of 8 * 32
    latent_channels: int  # structured-latent channels (8 in the release)
    num_blocks: int  # number of transformer blocks (12 in the release)
    num_heads: int | None = None  # attention heads; None -> model_channels // num_head_channels
    num_head_channels: int = 64  # head width used when num_heads is None
    mlp_ratio: float = 4.0  # MLP hidden size / model_channels
    attn_mode: str = "swin"  # "swin": 3-D windows shifted by half a window every other block; or "full"
    window_size: int = 8  # window side in voxels for "swin"
    pe_mode: str = "ape"  # position encoding; only absolute ("ape", the release's) is built
    use_fp16: bool = False  # the release runs its torso in fp16; `set_torso_dtype` chooses the actual dtype
    use_checkpoint: bool = False  # training-time gradient checkpointing in TRELLIS; unused for inference
    qk_rms_norm: bool = False  # RMS-normalise queries/keys in self-attention
    representation_config: dict = field(default_factory=dict)  # {"use_color": bool}; the release predicts colour

    def __post_init__(self):
        if self.pe_mode != "ape":
            raise ValueError(
                f"SLatMeshDecoder: pe_mode {self.pe_mode!r} is not supported; only 'ape' (the released model's)"
            )
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(
                f"SLatMeshDecoder: attn_mode {self.attn_mode!r} is not supported; use one of {ATTN_MODES} (the release "
                "uses 'swin')"
            )
        if self.model_channels % (8 * NUM_GROUPS):
            raise ValueError(
                f"SLatMeshDecoder: model_channels {self.model_channels} must be a multiple of {8 * NUM_GROUPS} "
                f"(the subdivision blocks run GroupNorm({NUM_GROUPS}) on model_channels / 8 channels)"
            )
        unknown = set(self.representation_config) - {"use_color"}
        if unknown:
            raise ValueError(f"SLatMeshDecoder: unknown representation_config keys {sorted(unknown)}; only 'use_color'")
        if self.num_heads is None:
            self.num_heads = self.model_channels // self.num_head_channels
        if self.num_heads <= 0 or self.model_channels % self.num_heads:
            raise ValueError(
                f"SLatMeshDecoder: model_channels {self.model_channels} must be a positive multiple of num_heads "
                f"{self.num_heads}"
            )

    @property
    def use_color(self) -> bool:
        return bool(self.representation_config.get("use_color", False))


class SparseSubdivideBlock3d(nn.Module):
    """Norm + SiLU, subdivide each voxel into 8, then a conv res-block at twice the resolution."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.act_layers = nn.Sequential(sp.SparseGroupNorm32(NUM_GROUPS, channels), sp.SparseSiLU())
        self.sub = sp.SparseSubdivide()
        self.out_layers = nn.Sequential(
            sp.SparseConv3d(channels, out_channels, 3),
            sp.SparseGroupNorm32(NUM_GROUPS, out_channels),
            sp.SparseSiLU(),
            sp.SparseConv3d(out_channels, out_channels, 3),
        )
        self.skip_connection = sp.SparseConv3d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def forward(self, x: sp.SparseTensor) -> sp.SparseTensor:
        """feats (M, channels) at resolution r -> (8M, out_channels) at 2r."""
        h = self.out_layers(self.sub(self.act_layers(x)))
        return h + self.skip_connection(self.sub(x))


def swin_blocks(width: int, config) -> nn.ModuleList:
    """The structured-latent VAE's transformer: config.num_blocks sparse blocks, windows shifted every other block
    under attn_mode "swin" (shared by SLatEncoder and SLatMeshDecoder, as TRELLIS's SparseTransformerBase is)."""
    swin = config.attn_mode == "swin"
    return nn.ModuleList(
        sp.SparseTransformerBlock(
            width,
            config.num_heads,
            mlp_ratio=config.mlp_ratio,
            attn_mode="windowed" if swin else "full",
            window_size=config.window_size,
            shift_window=config.window_size // 2 * (i % 2) if swin else 0,
            qk_rms_norm=config.qk_rms_norm,
        )
        for i in range(config.num_blocks)
    )


class SLatMeshDecoder(nn.Module):
    config_class = SLatMeshDecoderConfig

    def __init__(self, config: SLatMeshDecoderConfig):
        super().__init__()
        self.config = config
        width = config.model_channels
        self.input_layer = sp.SparseLinear(config.latent_channels, width)
        self.blocks = swin_blocks(width, config)
        self.upsample = nn.ModuleList(
            [SparseSubdivideBlock3d(width, width // 4), SparseSubdivideBlock3d(width // 4, width // 8)]
        )
        self.out_layer = sp.SparseLinear(width // 8, cube_feature_channels(config.use_color))
        self.torso_dtype = torch.float32
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, zeroed second convs of the subdivision blocks and zeroed output layer (TRELLIS's init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.upsample:
            nn.init.zeros_(block.out_layers[3].conv.weight)
            nn.init.zeros_(block.out_layers[3].conv.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the transformer and subdivision blocks' linear/conv weights in `dtype`; norms stay float32."""
        for part in (self.blocks, self.upsample):
            for module in part.modules():
                if isinstance(module, (nn.Linear, sp.SparseConv3d)):
                    module.to(dtype)
        self.torso_dtype = dtype

    def forward(self, x: sp.SparseTensor) -> sp.SparseTensor:
        """Latent feats (M, latent_channels) at `resolution` -> cube features (64M, channels) at 4x resolution."""
        if x.feats.shape[1:] != (self.config.latent_channels,):
            raise ValueError(
                f"mesh decoder input features must be (M, {self.config.latent_channels}), got {tuple(x.feats.shape)}"
            )
        h = self.input_layer(x.type(self.input_layer.weight.dtype))
        h = h.replace(h.feats + absolute_position_embedding(x.coords[:, 1:], h.feats.shape[1]))
        h = h.type(self.torso_dtype)
        for block in self.blocks:
            h = block(h)
        for block in self.upsample:
            h = block(h)
        return self.out_layer(h.type(self.out_layer.weight.dtype))

    def to_meshes(self, cube_features: sp.SparseTensor) -> list[trimesh.Trimesh]:
        """Cube features from `forward` -> one mesh per batch element, in [-0.5, 0.5]^3."""
        resolution = 4 * self.config.resolution
        return [
            extract_mesh(part.coords[:, 1:], part.feats, resolution, self.config.use_color)
            for part in cube_features.split_batch()
        ]

    @torch.no_grad()
    def decode(self, latent: sp.SparseTensor) -> list[trimesh.Trimesh]:
        """Structured latent (un-normalised, M x latent_channels on voxels) -> one trimesh per batch element."""
        return self.to_meshes(self.forward(latent))
