"""Attention over sparse voxels with `F.scaled_dot_product_attention`.

Variable-length sequences (the voxels of each batch element, or of each window) are scattered into
a zero-padded batch and attended with a key-padding mask, which equals attending each sequence on
its own. Module and parameter names follow TRELLIS's SparseMultiHeadAttention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gap3d.trellis.sparse.tensor import SparseTensor, pad_batch, unpad_batch
from gap3d.trellis.transformer import MultiHeadRMSNorm


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Lq, H, C), (B, Lk, H, C) x2, (B, Lk) bool or None -> (B, Lq, H, C)."""
    mask = None if key_mask is None or bool(key_mask.all()) else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def sparse_self_attention(qkv: SparseTensor) -> torch.Tensor:
    """Full self-attention within each batch element: qkv feats (M, 3, H, C) -> (M, H, C)."""
    padded, mask = pad_batch(qkv)  # (B, L, 3, H, C), (B, L)
    q, k, v = padded.unbind(dim=2)
    return unpad_batch(qkv, _masked_sdpa(q, k, v, mask))


def sparse_cross_attention(q: SparseTensor, kv: torch.Tensor) -> torch.Tensor:
    """Voxels attend to a dense context: q feats (M, H, C), kv (B, N, 2, H, C) -> (M, H, C)."""
    if kv.shape[0] != q.batch_size:
        raise ValueError(f"context batch {kv.shape[0]} does not match the sparse batch {q.batch_size}")
    padded_q, _ = pad_batch(q)  # (B, L, H, C); padded query rows are computed and dropped
    k, v = kv.unbind(dim=2)
    return unpad_batch(q, _masked_sdpa(padded_q, k, v, None))


def window_partition(x: SparseTensor, window_size: int, shift: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Window of each voxel after shifting coordinates by +`shift`: (M,) window id, (M,) slot, max length."""
    key = f"windows_{window_size}_{shift}"
    if key not in x.cache:
        cell = torch.div(x.coords[:, 1:].long() + shift, window_size, rounding_mode="floor")  # (M, 3)
        extent = int(cell.max()) + 1
        code = ((x.batch_index * extent + cell[:, 0]) * extent + cell[:, 1]) * extent + cell[:, 2]
        _, window, counts = torch.unique(code, return_inverse=True, return_counts=True)
        order = torch.argsort(window, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(window)
        slot[order] = torch.arange(window.shape[0], device=x.device) - starts[window[order]]
        x.cache[key] = (window, slot, int(counts.max()))
    return x.cache[key]


def sparse_windowed_self_attention(qkv: SparseTensor, window_size: int, shift: int) -> torch.Tensor:
    """Self-attention within cubic windows of `window_size` voxels (coords shifted by `shift`): (M, H, C)."""
    window, slot, max_len = window_partition(qkv, window_size, shift)
    num_windows = int(window.max()) + 1
    padded = qkv.feats.new_zeros((num_windows, max_len, *qkv.feats.shape[1:]))  # (W, L, 3, H, C)
    padded[window, slot] = qkv.feats
    mask = torch.zeros(num_windows, max_len, dtype=torch.bool, device=qkv.device)
    mask[window, slot] = True
    q, k, v = padded.unbind(dim=2)
    return _masked_sdpa(q, k, v, mask)[window, slot]


class SparseMultiHeadAttention(nn.Module):
    """Self-attention ("full" or "windowed") over voxels, or full cross-attention to a dense context."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        cross: bool = False,
        attn_mode: str = "full",
        window_size: int | None = None,
        shift_window: int = 0,
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        if attn_mode not in ("full", "windowed") or (cross and attn_mode != "full"):
            raise ValueError(f"unsupported attention mode {attn_mode!r} (cross={cross}); use 'full' or 'windowed'")
        if attn_mode == "windowed" and not window_size:
            raise ValueError("windowed attention needs a window_size")
        self.num_heads = num_heads
        self.cross = cross
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.shift_window = shift_window
        self.qk_rms_norm = qk_rms_norm
        if cross:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, channels * 2, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def _self(self, x: SparseTensor) -> torch.Tensor:
        qkv = self.to_qkv(x.feats).reshape(x.feats.shape[0], 3, self.num_heads, -1)  # (M, 3, H, C)
        if self.qk_rms_norm:
            q, k, v = qkv.unbind(dim=1)
            qkv = torch.stack([self.q_rms_norm(q), self.k_rms_norm(k), v], dim=1)
        qkv = x.replace(qkv)
        if self.attn_mode == "windowed":
            return sparse_windowed_self_attention(qkv, self.window_size, self.shift_window)
        return sparse_self_attention(qkv)

    def _cross(self, x: SparseTensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x.feats).reshape(x.feats.shape[0], self.num_heads, -1)  # (M, H, C)
        kv = self.to_kv(context).reshape(*context.shape[:2], 2, self.num_heads, -1)  # (B, N, 2, H, C)
        if self.qk_rms_norm:
            q = self.q_rms_norm(q)
            k, v = kv.unbind(dim=2)
            kv = torch.stack([self.k_rms_norm(k), v], dim=2)
        return sparse_cross_attention(x.replace(q), kv)

    def forward(self, x: SparseTensor, context: torch.Tensor | None = None) -> SparseTensor:
        h = self._cross(x, context) if self.cross else self._self(x)  # (M, H, C)
        return x.replace(self.to_out(h.reshape(h.shape[0], -1)))
