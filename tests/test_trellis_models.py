"""Stage-1 modules: output shapes and their building blocks against reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from gap3d.trellis.loading import build_model
from gap3d.trellis.sparse_structure_decoder import ChannelLayerNorm32, pixel_shuffle_3d
from gap3d.trellis.sparse_structure_flow import SparseStructureFlowConfig, patchify, unpatchify
from gap3d.trellis.transformer import MultiHeadAttention, TimestepEmbedder, absolute_position_embedding

FLOW_ARGS = {
    "resolution": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "cond_channels": 24,
    "num_blocks": 2,
    "num_heads": 4,
    "patch_size": 2,
    "qk_rms_norm": True,
}
DECODER_ARGS = {
    "out_channels": 1,
    "latent_channels": 4,
    "num_res_blocks": 1,
    "num_res_blocks_middle": 1,
    "channels": [16, 8, 8],
}


@pytest.mark.parametrize("num_tokens", [1, 7, 261])
def test_flow_model_maps_latent_to_velocity_of_same_shape_for_any_token_count(num_tokens):
    model = build_model({"name": "SparseStructureFlowModel", "args": FLOW_ARGS})
    out = model(torch.randn(2, 4, 8, 8, 8), torch.tensor([0.0, 500.0]), torch.randn(2, num_tokens, 24))
    assert out.shape == (2, 4, 8, 8, 8)


def test_flow_model_rejects_a_latent_of_the_wrong_resolution():
    model = build_model({"name": "SparseStructureFlowModel", "args": FLOW_ARGS})
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8, 8\)"):
        model(torch.randn(1, 4, 16, 16, 16), torch.zeros(1), torch.randn(1, 3, 24))


def test_decoder_upsamples_by_two_per_extra_width():
    model = build_model({"name": "SparseStructureDecoder", "args": DECODER_ARGS})
    assert model(torch.randn(2, 4, 4, 4, 4)).shape == (2, 1, 16, 16, 16)


def test_flow_model_runs_with_a_bfloat16_torso():
    model = build_model({"name": "SparseStructureFlowModel", "args": FLOW_ARGS})
    x, t, cond = torch.randn(1, 4, 8, 8, 8), torch.tensor([300.0]), torch.randn(1, 5, 24)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    reference = model(x, t, cond)
    model.set_torso_dtype(torch.bfloat16)
    out = model(x, t, cond)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.1)


def test_unknown_config_field_names_the_class_and_field():
    with pytest.raises(ValueError, match="SparseStructureFlowModel.*window_size"):
        build_model({"name": "SparseStructureFlowModel", "args": {**FLOW_ARGS, "window_size": 8}})


def test_num_heads_defaults_to_width_over_head_channels():
    config = SparseStructureFlowConfig(**{**FLOW_ARGS, "num_heads": None, "num_head_channels": 8})
    assert config.num_heads == 4


def test_patchify_folds_each_patch_into_channels_and_unpatchify_inverts_it():
    x = torch.arange(2 * 3 * 4**3, dtype=torch.float32).reshape(2, 3, 4, 4, 4)
    folded = patchify(x, 2)
    assert folded.shape == (2, 24, 2, 2, 2)
    # channel c * 8 + (i * 4 + j * 2 + k) of patch (a, b, d) holds voxel (2a + i, 2b + j, 2d + k) of channel c
    assert folded[1, 2 * 8 + 5, 1, 0, 1] == x[1, 2, 3, 0, 3]
    torch.testing.assert_close(unpatchify(folded, 2), x)


def test_pixel_shuffle_3d_places_channel_groups_at_cell_offsets():
    x = torch.randn(1, 2 * 8, 3, 3, 3)
    out = pixel_shuffle_3d(x, 2)
    assert out.shape == (1, 2, 6, 6, 6)
    # output channel c at (2p + i, 2q + j, 2r + k) comes from input channel c * 8 + i * 4 + j * 2 + k at (p, q, r)
    assert out[0, 1, 2 * 1 + 1, 2 * 2 + 0, 2 * 0 + 1] == x[0, 8 + 4 + 0 + 1, 1, 2, 0]


def test_channel_layer_norm_normalises_each_voxel_over_channels():
    norm = ChannelLayerNorm32(6)
    x = torch.randn(2, 6, 3, 3, 3)
    expected = F.layer_norm(x.permute(0, 2, 3, 4, 1), (6,)).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(norm(x), expected)


def test_self_attention_matches_a_per_head_softmax_reference():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, num_heads=2, qk_rms_norm=True)
    x = torch.randn(1, 5, 8)
    q, k, v = attn.to_qkv(x).reshape(1, 5, 3, 2, 4).unbind(2)
    # RMS norm with gamma = 1: each head vector scaled to norm sqrt(head_dim)
    q, k = q / q.norm(dim=-1, keepdim=True) * 2.0, k / k.norm(dim=-1, keepdim=True) * 2.0
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(4), dim=-1)
    expected = attn.to_out(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_cross_attention_reads_context_of_another_width_and_length():
    attn = MultiHeadAttention(8, num_heads=2, ctx_channels=3, cross=True)
    assert attn(torch.randn(2, 5, 8), torch.randn(2, 11, 3)).shape == (2, 5, 8)


def test_timestep_features_are_cosines_then_sines():
    features = TimestepEmbedder.sinusoid(torch.tensor([2.0]), dim=4, max_period=100.0)
    # half = 2 frequencies: exp(-ln(100) * [0, 1] / 2) = [1, 0.1]
    expected = torch.tensor([[math.cos(2.0), math.cos(0.2), math.sin(2.0), math.sin(0.2)]])
    torch.testing.assert_close(features, expected)


def test_absolute_position_embedding_is_sines_then_cosines_per_axis_zero_padded():
    emb = absolute_position_embedding(torch.tensor([[1, 2, 3]]), channels=8)
    # channels // 3 // 2 = 1 frequency (1.0) per axis: [sin x, cos x, sin y, cos y, sin z, cos z, 0, 0]
    expected = torch.tensor([[math.sin(1), math.cos(1), math.sin(2), math.cos(2), math.sin(3), math.cos(3), 0.0, 0.0]])
    torch.testing.assert_close(emb, expected)
