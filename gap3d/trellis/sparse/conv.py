"""Submanifold sparse 3-D convolution by neighbour gathering over hashed voxel coordinates.

A submanifold convolution keeps the input voxels as the output voxels: output voxel p sums
W[offset] @ x[p + offset - centre] over the kernel offsets whose neighbour is occupied, which is
exactly a dense `F.conv3d` (cross-correlation, zero padding k // 2) read at the occupied sites when
empty sites hold zeros (for k = 1 see spconv's quirk below). Neighbours are found by encoding each
[batch, x, y, z] as one int64 key and binary-searching the sorted keys (a hash table that works the
same on CPU and CUDA).

Weights use spconv 2.x's saved layout (out, kx, ky, kz, in) under `<name>.conv.weight`, which is
how the released TRELLIS checkpoints (trained with spconv) store them. Kernel index (a, b, c) reads
the voxel at [x, y, z] + (a, b, c) - k // 2 (spconv's convention, that of F.conv3d: no kernel flip).

One spconv quirk is kept on purpose: spconv >= 2.2 runs a 1x1x1 submanifold conv as
`feats @ weight.view(in, out)` on its (out, 1, 1, 1, in) parameter, i.e. it reads the stored memory
as an (in, out) matrix, not as the (out, in) matrix the shape suggests (spconv issue #450). The
released mesh decoder's subdivision skip connections are such convs and were trained that way, so
we apply their weights the same way.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from gap3d.trellis.sparse.tensor import SparseTensor

# Values in one gathered neighbour block of `SubmanifoldConv3dWeights` (64 MiB in float32).
GATHER_BUDGET = 1 << 24


def _encode(coords: torch.Tensor, extent: int) -> torch.Tensor:
    """(M, 4) [batch, x, y, z] with 0 <= x, y, z < extent -> (M,) int64 keys ordered like the rows."""
    c = coords.long()
    return ((c[:, 0] * extent + c[:, 1]) * extent + c[:, 2]) * extent + c[:, 3]


def lookup_voxels(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Row index of each query [batch, x, y, z] (Q, 4) in `table` (M, 4), or -1 where absent."""
    # the margin keeps every shifted coordinate non-negative and below `extent`
    margin = 1 + int(queries[:, 1:].abs().max()) if queries.numel() else 1
    extent = 2 * margin + int(table[:, 1:].max()) + 1
    shift = torch.tensor([0, margin, margin, margin], device=table.device, dtype=torch.int64)
    keys = _encode(table.long() + shift, extent)
    sorted_keys, order = torch.sort(keys)
    query_keys = _encode(queries.long() + shift, extent)
    slot = torch.searchsorted(sorted_keys, query_keys).clamp(max=sorted_keys.shape[0] - 1)
    found = sorted_keys[slot] == query_keys
    return torch.where(found, order[slot], torch.full_like(slot, -1))


def kernel_offsets(kernel_size: int, device: torch.device) -> torch.Tensor:
    """(K^3, 3) offsets in the (kx, ky, kz) row-major order of the weight tensor."""
    r = kernel_size // 2
    grid = itertools.product(range(-r, r + 1), repeat=3)
    return torch.tensor(list(grid), device=device, dtype=torch.int64)


def neighbour_map(x: SparseTensor, kernel_size: int) -> torch.Tensor:
    """(M, K^3) row of the neighbour of each voxel at each kernel offset, M where empty (a zero row); cached."""
    key = f"neighbours_{kernel_size}"
    if key not in x.cache:
        offsets = kernel_offsets(kernel_size, x.device)  # (K, 3)
        coords = x.coords.long()
        queries = coords[:, None].repeat(1, offsets.shape[0], 1)  # (M, K, 4)
        queries[:, :, 1:] += offsets[None]
        rows = lookup_voxels(coords, queries.reshape(-1, 4)).reshape(coords.shape[0], -1)
        x.cache[key] = torch.where(rows >= 0, rows, coords.shape[0])
    return x.cache[key]


class SubmanifoldConv3dWeights(nn.Module):
    """Holds a submanifold conv's weight (out, k, k, k, in) and bias (out,) and applies them."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1), a=5**0.5)

    def forward(self, x: SparseTensor) -> torch.Tensor:
        feats = x.feats.to(self.weight.dtype)  # (M, in)
        weight = self.weight.reshape(self.out_channels, -1)  # (out, K * in), offset-major like the gather below
        if self.kernel_size == 1:
            # spconv's 1x1x1 path: the (out, 1, 1, 1, in) memory read as an (in, out) matrix (see module doc)
            out = feats @ self.weight.reshape(self.in_channels, self.out_channels)
        else:
            # Gather every neighbour into one (rows, K * in) block and multiply once: far faster than a
            # scatter-add per offset. Chunking the rows bounds the block's memory.
            neighbours = neighbour_map(x, self.kernel_size)  # (M, K)
            padded = torch.cat([feats, feats.new_zeros(1, self.in_channels)])  # row M: absent neighbour
            rows = max(1, GATHER_BUDGET // weight.shape[1])
            out = torch.cat(
                [
                    padded[neighbours[start : start + rows]].flatten(1) @ weight.t()
                    for start in range(0, feats.shape[0], rows)
                ]
            )
        if self.bias is not None:
            out = out + self.bias
        return out  # (M, out)


class SparseConv3d(nn.Module):
    """Submanifold sparse conv (stride 1, odd kernel) with TRELLIS's `<name>.conv.{weight,bias}` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"submanifold convolution needs an odd kernel size, got {kernel_size}")
        self.conv = SubmanifoldConv3dWeights(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.conv(x))
