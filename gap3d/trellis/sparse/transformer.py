"""Sparse transformer blocks with TRELLIS's module names (attn / self_attn / cross_attn / mlp / norm*)."""

from __future__ import annotations

import torch
import torch.nn as nn

from gap3d.trellis.sparse.attention import SparseMultiHeadAttention
from gap3d.trellis.sparse.layers import SparseGELU, SparseLinear
from gap3d.trellis.sparse.tensor import SparseTensor
from gap3d.trellis.transformer import LayerNorm32


class SparseFeedForwardNet(nn.Module):
    """Linear -> GELU(tanh) -> Linear on each voxel; keys mlp.0 / mlp.2."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            SparseLinear(channels, hidden), SparseGELU(approximate="tanh"), SparseLinear(hidden, channels)
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.mlp(x)


class SparseTransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block (the structured-latent decoders' blocks)."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        window_size: int | None = None,
        shift_window: int = 0,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseMultiHeadAttention(
            channels,
            num_heads,
            attn_mode=attn_mode,
            window_size=window_size,
            shift_window=shift_window,
            qk_rms_norm=qk_rms_norm,
        )
        self.mlp = SparseFeedForwardNet(channels, mlp_ratio)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x + self.attn(x.replace(self.norm1(x.feats)))
        return x + self.mlp(x.replace(self.norm2(x.feats)))


class ModulatedSparseTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention + cross-attention + MLP block (the structured-latent flow's blocks)."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseMultiHeadAttention(channels, num_heads, qk_rms_norm=qk_rms_norm)
        self.cross_attn = SparseMultiHeadAttention(
            channels, num_heads, ctx_channels=ctx_channels, cross=True, qk_rms_norm=qk_rms_norm_cross
        )
        self.mlp = SparseFeedForwardNet(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def forward(self, x: SparseTensor, mod: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        """x feats (M, C), mod (B, C) timestep embedding, context (B, N, ctx_channels)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(mod).chunk(6, dim=1)
        h = x.replace(self.norm1(x.feats)) * (1 + scale_msa) + shift_msa
        x = x + self.self_attn(h) * gate_msa
        x = x + self.cross_attn(x.replace(self.norm2(x.feats)), context)
        h = x.replace(self.norm3(x.feats)) * (1 + scale_mlp) + shift_mlp
        return x + self.mlp(h) * gate_mlp
