"""Sparse voxel ops of gap3d.trellis.sparse against dense / per-sample reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

import gap3d.trellis.sparse as sp

RES = 8


def random_voxels(
    batch_size: int = 2, res: int = RES, density: float = 0.3, channels: int = 5, seed: int = 0
) -> sp.SparseTensor:
    """Random occupied voxels of a res^3 grid per batch element, with random features."""
    generator = torch.Generator().manual_seed(seed)
    occupied = torch.rand(batch_size, res, res, res, generator=generator) < density
    coords = torch.nonzero(occupied).int()  # row-major: grouped by batch, ascending
    return sp.SparseTensor(torch.randn(coords.shape[0], channels, generator=generator), coords)


def to_dense(x: sp.SparseTensor, res: int) -> torch.Tensor:
    """(M, C) voxels -> (B, C, res, res, res) with zeros at empty sites."""
    dense = x.feats.new_zeros(x.batch_size, x.feats.shape[1], res, res, res)
    b, i, j, k = x.coords.long().unbind(dim=1)
    dense[b, :, i, j, k] = x.feats
    return dense


def read_dense(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(B, C, R, R, R) read at coords (M, 4) -> (M, C)."""
    b, i, j, k = coords.long().unbind(dim=1)
    return dense[b, :, i, j, k]


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_submanifold_conv_equals_dense_conv3d_at_occupied_sites(kernel_size):
    torch.manual_seed(0)
    x = random_voxels()
    conv = sp.SparseConv3d(5, 7, kernel_size)
    torch.nn.init.normal_(conv.conv.bias)
    if kernel_size == 1:  # spconv reads a 1x1x1 weight's (out, 1, 1, 1, in) memory as an (in, out) matrix
        dense_weight = conv.conv.weight.reshape(5, 7).t().reshape(7, 5, 1, 1, 1)
    else:
        dense_weight = conv.conv.weight.permute(0, 4, 1, 2, 3)  # spconv (out, kx, ky, kz, in) -> conv3d layout
    reference = F.conv3d(to_dense(x, RES), dense_weight, conv.conv.bias, padding=kernel_size // 2)
    out = conv(x)
    torch.testing.assert_close(out.feats, read_dense(reference, x.coords), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.coords, x.coords)


def test_conv_weight_uses_spconv_layout_and_key_names():
    conv = sp.SparseConv3d(4, 6, 3)
    shapes = {key: tuple(value.shape) for key, value in conv.state_dict().items()}
    assert shapes == {"conv.weight": (6, 3, 3, 3, 4), "conv.bias": (6,)}


def test_conv_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd kernel"):
        sp.SparseConv3d(4, 4, 2)


def test_lookup_finds_present_voxels_and_marks_absent_ones():
    table = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [1, 1, 2, 3]])
    queries = torch.tensor([[1, 1, 2, 3], [0, 4, 4, 4], [0, 4, 4, 5], [0, -1, 0, 0], [2, 1, 2, 3]])
    assert sp.lookup_voxels(table, queries).tolist() == [2, 1, -1, -1, -1]


def test_downsample_matches_dense_pooling_with_trellis_mean():
    x = random_voxels()
    down = sp.SparseDownsample(2)(x)
    occupancy = to_dense(x.replace(torch.ones(x.feats.shape[0], 1)), RES)
    counts = F.avg_pool3d(occupancy, 2) * 8  # occupied children per coarse cell
    sums = F.avg_pool3d(to_dense(x, RES), 2) * 8
    expected_coords = torch.nonzero(counts[:, 0] > 0).int()
    assert torch.equal(down.coords, expected_coords)
    # TRELLIS's scatter_reduce("mean") counts the zero it reduces onto: sum / (n + 1)
    expected = read_dense(sums / (counts + 1), expected_coords)
    torch.testing.assert_close(down.feats, expected)


def test_upsample_restores_fine_voxels_with_parent_features():
    x = random_voxels()
    down = sp.SparseDownsample(2)(x)
    up = sp.SparseUpsample(2)(down.replace(down.feats * 3))
    assert torch.equal(up.coords, x.coords)
    nearest = F.interpolate(to_dense(down, RES // 2) * 3, scale_factor=2, mode="nearest")
    torch.testing.assert_close(up.feats, read_dense(nearest, x.coords))


def test_upsample_without_paired_downsample_raises():
    with pytest.raises(ValueError, match="SparseDownsample"):
        sp.SparseUpsample(2)(random_voxels())


def test_subdivide_gives_eight_children_with_parent_features():
    x = random_voxels(res=4)
    sub = sp.SparseSubdivide()(x)
    occupancy = to_dense(x.replace(torch.ones(x.feats.shape[0], 1)), 4)
    fine = F.interpolate(occupancy, scale_factor=2, mode="nearest")
    assert sorted(map(tuple, sub.coords.tolist())) == sorted(map(tuple, torch.nonzero(fine[:, 0] > 0).tolist()))
    nearest = F.interpolate(to_dense(x, 4), scale_factor=2, mode="nearest")
    torch.testing.assert_close(sub.feats, read_dense(nearest, sub.coords))


def test_group_norm_normalises_each_batch_element_separately():
    x = random_voxels(channels=8)
    norm = sp.SparseGroupNorm32(4, 8)
    torch.nn.init.normal_(norm.weight)
    out = norm(x)
    for rows in x.layout:
        element = x.feats[rows].t().unsqueeze(0)  # (1, C, n)
        expected = F.group_norm(element, 4, norm.weight, norm.bias, norm.eps).squeeze(0).t()
        torch.testing.assert_close(out.feats[rows], expected)


def test_variable_length_self_attention_equals_per_sample_attention():
    x = random_voxels(batch_size=3, channels=2 * 3 * 4)
    qkv = x.replace(x.feats.reshape(-1, 3, 2, 4))  # (M, 3, H, C)
    out = sp.sparse_self_attention(qkv)
    for rows in x.layout:
        q, k, v = qkv.feats[rows].permute(1, 2, 0, 3)  # (H, n, C) each
        expected = F.scaled_dot_product_attention(q, k, v).transpose(0, 1)  # (n, H, C)
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_equals_per_sample_attention_to_dense_context():
    x = random_voxels(batch_size=2, channels=2 * 4)
    q = x.replace(x.feats.reshape(-1, 2, 4))  # (M, H, C)
    kv = torch.randn(2, 6, 2, 2, 4)  # (B, N, 2, H, C)
    out = sp.sparse_cross_attention(q, kv)
    for b, rows in enumerate(x.layout):
        expected = F.scaled_dot_product_attention(
            q.feats[rows].transpose(0, 1), kv[b, :, 0].transpose(0, 1), kv[b, :, 1].transpose(0, 1)
        ).transpose(0, 1)
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_windowed_attention_equals_direct_per_window_softmax(shift):
    window = 4
    x = random_voxels(batch_size=2, channels=3 * 2 * 4, density=0.4)
    qkv = x.replace(x.feats.reshape(-1, 3, 2, 4))
    out = sp.sparse_windowed_self_attention(qkv, window, shift)
    cell = (x.coords[:, 1:].long() + shift) // window
    groups = {}
    for row, key in enumerate(zip(x.coords[:, 0].tolist(), *cell.t().tolist())):
        groups.setdefault(key, []).append(row)
    assert len(groups) > 1
    for rows in groups.values():
        q, k, v = qkv.feats[rows].unbind(dim=1)  # (n, H, C)
        scores = torch.einsum("ihc,jhc->hij", q, k) / math.sqrt(q.shape[-1])
        expected = torch.einsum("hij,jhc->ihc", scores.softmax(dim=-1), v)
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)


def test_attention_module_keys_follow_trellis_names():
    self_attn = sp.SparseMultiHeadAttention(16, 4, qk_rms_norm=True)
    cross_attn = sp.SparseMultiHeadAttention(16, 4, ctx_channels=12, cross=True)
    assert {k: tuple(v.shape) for k, v in self_attn.state_dict().items()} == {
        "to_qkv.weight": (48, 16),
        "to_qkv.bias": (48,),
        "q_rms_norm.gamma": (4, 4),
        "k_rms_norm.gamma": (4, 4),
        "to_out.weight": (16, 16),
        "to_out.bias": (16,),
    }
    assert sorted(cross_attn.state_dict()) == [
        "to_kv.bias",
        "to_kv.weight",
        "to_out.bias",
        "to_out.weight",
        "to_q.bias",
        "to_q.weight",
    ]
    assert cross_attn.state_dict()["to_kv.weight"].shape == (32, 12)


def test_sparse_tensor_rejects_an_empty_voxel_set():
    with pytest.raises(ValueError, match="at least one voxel"):
        sp.SparseTensor(torch.zeros(0, 8), torch.zeros(0, 4, dtype=torch.int32))


def test_sparse_tensor_rejects_coords_not_grouped_by_batch():
    coords = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="grouped by batch"):
        sp.SparseTensor(torch.zeros(2, 3), coords)


def test_per_batch_tensors_broadcast_to_each_elements_voxels():
    x = random_voxels(batch_size=2, channels=3)
    scale = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]])
    out = x * scale + 1
    for b, rows in enumerate(x.layout):
        torch.testing.assert_close(out.feats[rows], x.feats[rows] * scale[b] + 1)
