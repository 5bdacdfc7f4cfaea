"""Per-voxel layers on SparseTensor features: linear, activations, group norm (in float32 as in TRELLIS)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gap3d.trellis.sparse.tensor import SparseTensor


class SparseLinear(nn.Linear):
    """nn.Linear on each voxel's features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.SiLU):
    """SiLU on each voxel's features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseGELU(nn.GELU):
    """GELU on each voxel's features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm over all voxels of each batch element (statistics per element), in float32."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = torch.empty_like(x.feats)
        for rows in x.layout:
            element = x.feats[rows].float().t().unsqueeze(0)  # (1, C, n)
            normed = F.group_norm(element, self.num_groups, self.weight, self.bias, self.eps)
            out[rows] = normed.squeeze(0).t().type(x.dtype)
        return x.replace(out)
