"""Sparse voxel tensors and the plain-PyTorch sparse ops TRELLIS's structured-latent models need."""

from gap3d.trellis.sparse.attention import (
    SparseMultiHeadAttention,
    sparse_cross_attention,
    sparse_self_attention,
    sparse_windowed_self_attention,
)
from gap3d.trellis.sparse.conv import SparseConv3d, lookup_voxels
from gap3d.trellis.sparse.layers import SparseGELU, SparseGroupNorm32, SparseLinear, SparseSiLU
from gap3d.trellis.sparse.spatial import SparseDownsample, SparseSubdivide, SparseUpsample
from gap3d.trellis.sparse.tensor import SparseTensor, pad_batch, unpad_batch
from gap3d.trellis.sparse.transformer import (
    ModulatedSparseTransformerCrossBlock,
    SparseFeedForwardNet,
    SparseTransformerBlock,
)

__all__ = [
    "ModulatedSparseTransformerCrossBlock",
    "SparseConv3d",
    "SparseDownsample",
    "SparseFeedForwardNet",
    "SparseGELU",
    "SparseGroupNorm32",
    "SparseLinear",
    "SparseMultiHeadAttention",
    "SparseSiLU",
    "SparseSubdivide",
    "SparseTensor",
    "SparseTransformerBlock",
    "SparseUpsample",
    "lookup_voxels",
    "pad_batch",
    "sparse_cross_attention",
    "sparse_self_attention",
    "sparse_windowed_self_attention",
    "unpad_batch",
]
