"""Dense transformer parts of TRELLIS's flow models, in plain PyTorch.

Attribute names (`to_qkv`, `q_rms_norm.gamma`, `adaLN_modulation.1`, `mlp.mlp.0`, ...) follow the
official TRELLIS modules so released state dicts load unchanged. Attention runs through
F.scaled_dot_product_attention, which picks flash / memory-efficient kernels where they exist.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (fp16 torsos stay stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of queries or keys: unit-normalise, then scale by gamma * sqrt(head_dim)."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H, D) -> (B, L, H, D)."""
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on TRELLIS's token-major layout: (B, Lq, H, D), (B, Lk, H, D) x2 -> (B, Lq, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Full self- or cross-attention with optional per-head QK RMS norm."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        cross: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.cross = cross
        self.qk_rms_norm = qk_rms_norm
        head_dim = channels // num_heads
        if cross:
            self.to_q = nn.Linear(channels, channels)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels)
        else:
            self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C) [, context (B, N, ctx_channels)] -> (B, L, C)."""
        batch, length, channels = x.shape
        if self.cross:
            q = self.to_q(x).reshape(batch, length, self.num_heads, -1)
            k, v = self.to_kv(context).reshape(batch, context.shape[1], 2, self.num_heads, -1).unbind(dim=2)
        else:
            q, k, v = self.to_qkv(x).reshape(batch, length, 3, self.num_heads, -1).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(attention(q, k, v).reshape(batch, length, channels))


class FeedForwardNet(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention, plain cross-attention to the condition, adaLN-modulated MLP."""

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
        self.self_attn = MultiHeadAttention(channels, num_heads, qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(
            channels, num_heads, ctx_channels=ctx_channels, cross=True, qk_rms_norm=qk_rms_norm_cross
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), t_emb (B, C), context (B, N, ctx_channels) -> (B, L, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(t_emb).unsqueeze(1).chunk(6, dim=-1)
        )
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attn(h)
        x = x + self.cross_attn(self.norm2(x), context)
        h = self.norm3(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (x1000-scaled) flow time, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) times -> (B, dim) features, cosines first then sines (TRELLIS's order)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(embedding, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, hidden_size)."""
        features = self.sinusoid(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """Fixed sin/cos embedding of integer grid positions: (N, 3) -> (N, channels).

    Per axis: sines then cosines over channels // 3 // 2 frequencies; zero-padded up to `channels`.
    """
    num_points, num_axes = coords.shape
    freq_dim = channels // num_axes // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim))
    angles = torch.outer(coords.reshape(-1).float(), freqs)  # (N * 3, freq_dim)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(num_points, -1)
    return F.pad(embedding, (0, channels - embedding.shape[1]))
