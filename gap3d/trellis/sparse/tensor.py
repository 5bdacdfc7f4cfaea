"""A batched sparse voxel tensor: integer coordinates (M, 4) [batch, x, y, z] plus features (M, ...).

Rows of one batch element are contiguous and in ascending batch order, as in TRELLIS. Everything
derived from the coordinates alone (neighbour maps, window partitions, the parent of a downsampled
tensor) lives in `cache`, a dict shared by all tensors with the same coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SparseTensor:
    """Sparse voxels: `coords` (M, 4) int32 [batch, x, y, z], `feats` (M, ...) of any float dtype."""

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        cache: dict | None = None,
    ):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be (M, 4) [batch, x, y, z], got shape {tuple(coords.shape)}")
        if coords.dtype.is_floating_point:
            raise ValueError(f"coords must be an integer tensor, got {coords.dtype}")
        if coords.shape[0] == 0:
            raise ValueError(
                "SparseTensor needs at least one voxel, got coords of shape (0, 4): "
                "the sparse structure is empty (no occupied voxel)"
            )
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        self.feats = feats
        self.coords = coords.int()
        if cache is None:
            cache = {}
            batch = self.coords[:, 0]
            if bool((batch[1:] < batch[:-1]).any()) or int(batch.min()) < 0:
                raise ValueError("coords must be grouped by batch index in ascending order (sort by coords[:, 0])")
        self.cache = cache
        if batch_size is None:
            if "batch_size" not in self.cache:
                self.cache["batch_size"] = int(self.coords[:, 0].max()) + 1
            batch_size = self.cache["batch_size"]
        self.batch_size = batch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def shape(self) -> tuple[int, ...]:
        """(batch_size, *feature_shape), as TRELLIS reports it."""
        return (self.batch_size, *self.feats.shape[1:])

    @property
    def batch_index(self) -> torch.Tensor:
        """(M,) int64 batch element of each voxel."""
        return self.coords[:, 0].long()

    @property
    def seq_lens(self) -> list[int]:
        """Voxel count of each batch element."""
        if "seq_lens" not in self.cache:
            self.cache["seq_lens"] = torch.bincount(self.batch_index, minlength=self.batch_size).tolist()
        return self.cache["seq_lens"]

    @property
    def layout(self) -> list[slice]:
        """Row range of each batch element."""
        starts = [0]
        for n in self.seq_lens:
            starts.append(starts[-1] + n)
        return [slice(starts[i], starts[i + 1]) for i in range(self.batch_size)]

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same voxels (and cache), new features (M, ...)."""
        return SparseTensor(feats, self.coords, self.batch_size, self.cache)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseTensor:
        """Move features (and coordinates) to a device and/or cast features."""
        coords = self.coords if device is None else self.coords.to(device)
        cache = self.cache if coords.device == self.coords.device else None
        return SparseTensor(self.feats.to(device=device, dtype=dtype), coords, self.batch_size, cache)

    def type(self, dtype: torch.dtype) -> SparseTensor:
        """Same voxels, features cast to `dtype`."""
        return self.replace(self.feats.type(dtype))

    def reshape(self, *feature_shape: int) -> SparseTensor:
        """Reshape the per-voxel features, keeping the voxel axis."""
        return self.replace(self.feats.reshape(self.feats.shape[0], *feature_shape))

    def split_batch(self) -> list[SparseTensor]:
        """One single-element SparseTensor per batch element (batch column reset to 0)."""
        parts = []
        for rows in self.layout:
            coords = self.coords[rows].clone()
            coords[:, 0] = 0
            parts.append(SparseTensor(self.feats[rows], coords, 1))
        return parts

    def per_voxel(self, other: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-batch tensor (B, ...) to one row per voxel (M, ...)."""
        return other[self.batch_index]

    def _elementwise(self, other, op: Callable) -> SparseTensor:
        # A tensor whose leading dim is the batch size is per-batch (B, C); add per-voxel tensors via `replace`.
        if isinstance(other, SparseTensor):
            other = other.feats
        elif isinstance(other, torch.Tensor) and other.dim() >= 2 and other.shape[0] == self.batch_size:
            other = self.per_voxel(other)
        return self.replace(op(self.feats, other))

    def __neg__(self) -> SparseTensor:
        return self.replace(-self.feats)

    def __add__(self, other) -> SparseTensor:
        return self._elementwise(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other) -> SparseTensor:
        return self._elementwise(other, torch.sub)

    def __rsub__(self, other) -> SparseTensor:
        return self._elementwise(other, lambda a, b: b - a)

    def __mul__(self, other) -> SparseTensor:
        return self._elementwise(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other) -> SparseTensor:
        return self._elementwise(other, torch.div)

    def __repr__(self) -> str:
        return f"SparseTensor(voxels={self.coords.shape[0]}, shape={self.shape}, dtype={self.dtype})"


def pad_batch(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter voxel features (M, ...) into a zero-padded (B, L, ...) batch; also the (B, L) valid mask."""
    lens = torch.tensor(x.seq_lens, device=x.device)
    max_len = int(lens.max())
    starts = torch.cumsum(lens, 0) - lens
    position = torch.arange(x.feats.shape[0], device=x.device) - starts[x.batch_index]
    padded = x.feats.new_zeros((x.batch_size, max_len, *x.feats.shape[1:]))
    padded[x.batch_index, position] = x.feats
    mask = torch.arange(max_len, device=x.device)[None] < lens[:, None]
    return padded, mask


def unpad_batch(x: SparseTensor, padded: torch.Tensor) -> torch.Tensor:
    """Inverse of `pad_batch`: gather (B, L, ...) back to voxel rows (M, ...)."""
    lens = torch.tensor(x.seq_lens, device=x.device)
    starts = torch.cumsum(lens, 0) - lens
    position = torch.arange(x.feats.shape[0], device=x.device) - starts[x.batch_index]
    return padded[x.batch_index, position]
