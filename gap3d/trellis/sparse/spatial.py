"""Resolution changes of sparse tensors: average-pool downsampling, its paired upsampling, subdivision."""

from __future__ import annotations

import torch
import torch.nn as nn

from gap3d.trellis.sparse.tensor import SparseTensor


class SparseDownsample(nn.Module):
    """Pool voxels into cells of `factor`^3 (TRELLIS's mean, see below); remembers them for `SparseUpsample`."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        coarse = x.coords.long().clone()
        coarse[:, 1:] = torch.div(coarse[:, 1:], self.factor, rounding_mode="floor")
        extent = int(coarse[:, 1:].max()) + 1
        keys = ((coarse[:, 0] * extent + coarse[:, 1]) * extent + coarse[:, 2]) * extent + coarse[:, 3]
        unique_keys, parent = torch.unique(keys, return_inverse=True)  # sorted: batch stays ascending
        new_coords = torch.stack(
            [
                unique_keys // extent**3,
                unique_keys // extent**2 % extent,
                unique_keys // extent % extent,
                unique_keys % extent,
            ],
            dim=1,
        ).int()
        flat = x.feats.reshape(x.feats.shape[0], -1)
        sums = flat.new_zeros(unique_keys.shape[0], flat.shape[1]).index_add_(0, parent, flat)
        counts = torch.bincount(parent, minlength=unique_keys.shape[0]).to(flat.dtype)
        # TRELLIS pools with scatter_reduce("mean") onto zeros *including* the zero, i.e. sum / (n + 1);
        # the released weights were trained with that, so we keep it.
        pooled = sums / (counts[:, None] + 1)
        cache = {f"upsample_{self.factor}": (x.coords, x.cache, parent)}
        out = SparseTensor(pooled.reshape(-1, *x.feats.shape[1:]), new_coords, x.batch_size, cache)
        return out


class SparseUpsample(nn.Module):
    """Nearest-neighbour upsampling back onto the voxels a `SparseDownsample` pooled from."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        key = f"upsample_{self.factor}"
        if key not in x.cache:
            raise ValueError(
                f"SparseUpsample({self.factor}) needs a tensor produced by SparseDownsample({self.factor}) "
                "(it restores that tensor's voxels)"
            )
        fine_coords, fine_cache, parent = x.cache[key]
        return SparseTensor(x.feats[parent], fine_coords, x.batch_size, fine_cache)


class SparseSubdivide(nn.Module):
    """Split every voxel into its 8 children at twice the resolution, copying the features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        children = torch.tensor(
            [[0, i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], device=x.device, dtype=torch.int32
        )  # (8, 4)
        parent = x.coords.clone()
        parent[:, 1:] *= 2
        new_coords = (parent[:, None, :] + children[None]).reshape(-1, 4)  # (8M, 4)
        new_feats = x.feats.repeat_interleave(8, dim=0)  # (8M, ...)
        return SparseTensor(new_feats, new_coords, x.batch_size)
