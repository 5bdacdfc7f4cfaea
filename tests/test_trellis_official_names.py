"""The release's architecture args build modules whose state-dict names and shapes are those of the
official TRELLIS checkpoints, so the released safetensors load unchanged.

The expected names below were written out by hand from the public TRELLIS model code, independently
of our implementation: stage 1 from trellis/models/sparse_structure_flow.py, sparse_structure_vae.py,
modules/transformer/modulated.py, modules/attention/modules.py; stage 2 from
trellis/models/structured_latent_flow.py, structured_latent_vae/{base,decoder_mesh}.py,
modules/sparse/transformer/{blocks,modulated}.py, modules/sparse/attention/modules.py,
modules/sparse/{linear,norm}.py, modules/sparse/conv/conv_spconv.py (spconv's SubMConv3d, whose
weight is KRSC: (out, kx, ky, kz, in), spconv >= 2.2) and representations/mesh/cube2mesh.py.
Models are built on the meta device.

Cross-check done once by hand (too heavy for a unit test): saving our stage-2 state dicts with
safetensors, the torso's linears/convs in fp16 and everything else in fp32 (TRELLIS's
convert_to_fp16), gives files of exactly the released byte sizes, header included:
slat_flow_img_dit_L_64l8p2_fp16.safetensors 1,203,755,136 and
slat_dec_mesh_swin8_B_64l8m256c_fp16.safetensors 181,903,412.

The numeric tests at the end pin the sparse conv's weight convention to spconv's, the library the
released weights were trained with.
"""

import pytest
import torch

import gap3d.trellis.sparse as sp
from gap3d.trellis.config import (
    OFFICIAL_SLAT_FLOW_ARGS,
    OFFICIAL_SLAT_MESH_DECODER_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_ENCODER_ARGS,
    OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS,
)
from gap3d.trellis.loading import build_model


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def official_flow_shapes(width=1024, cond=1024, blocks=24, heads=16, channels=8, grid=16, mlp=4096) -> dict:
    expected = {
        "pos_emb": (grid**3, width),
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "input_layer.weight": (width, channels),
        "input_layer.bias": (width,),
        "out_layer.weight": (channels, width),
        "out_layer.bias": (channels,),
    }
    for i in range(blocks):
        expected.update(
            {f"blocks.{i}.{key}": shape for key, shape in modulated_cross_block(width, cond, heads, mlp).items()}
        )
    return expected


def modulated_cross_block(width: int, cond: int, heads: int, mlp: int) -> dict:
    """(Sparse)ModulatedTransformerCrossBlock with qk_rms_norm on self-attention only: norm1/norm3 carry
    no affine, norm2 does; the cross-attention has no RMS norms (qk_rms_norm_cross is False)."""
    head_dim = width // heads
    return {
        "norm2.weight": (width,),
        "norm2.bias": (width,),
        "self_attn.to_qkv.weight": (3 * width, width),
        "self_attn.to_qkv.bias": (3 * width,),
        "self_attn.q_rms_norm.gamma": (heads, head_dim),
        "self_attn.k_rms_norm.gamma": (heads, head_dim),
        "self_attn.to_out.weight": (width, width),
        "self_attn.to_out.bias": (width,),
        "cross_attn.to_q.weight": (width, width),
        "cross_attn.to_q.bias": (width,),
        "cross_attn.to_kv.weight": (2 * width, cond),
        "cross_attn.to_kv.bias": (2 * width,),
        "cross_attn.to_out.weight": (width, width),
        "cross_attn.to_out.bias": (width,),
        "mlp.mlp.0.weight": (mlp, width),
        "mlp.mlp.0.bias": (mlp,),
        "mlp.mlp.2.weight": (width, mlp),
        "mlp.mlp.2.bias": (width,),
        "adaLN_modulation.1.weight": (6 * width, width),
        "adaLN_modulation.1.bias": (6 * width,),
    }


def resblock(prefix: str, width: int) -> dict:
    return {
        f"{prefix}.norm1.weight": (width,),
        f"{prefix}.norm1.bias": (width,),
        f"{prefix}.conv1.weight": (width, width, 3, 3, 3),
        f"{prefix}.conv1.bias": (width,),
        f"{prefix}.norm2.weight": (width,),
        f"{prefix}.norm2.bias": (width,),
        f"{prefix}.conv2.weight": (width, width, 3, 3, 3),
        f"{prefix}.conv2.bias": (width,),
    }


def official_decoder_shapes() -> dict:
    expected = {
        "input_layer.weight": (512, 8, 3, 3, 3),
        "input_layer.bias": (512,),
        **resblock("middle_block.0", 512),
        **resblock("middle_block.1", 512),
        **resblock("blocks.0", 512),
        **resblock("blocks.1", 512),
        "blocks.2.conv.weight": (128 * 8, 512, 3, 3, 3),
        "blocks.2.conv.bias": (128 * 8,),
        **resblock("blocks.3", 128),
        **resblock("blocks.4", 128),
        "blocks.5.conv.weight": (32 * 8, 128, 3, 3, 3),
        "blocks.5.conv.bias": (32 * 8,),
        **resblock("blocks.6", 32),
        **resblock("blocks.7", 32),
        "out_layer.0.weight": (32,),
        "out_layer.0.bias": (32,),
        "out_layer.2.weight": (1, 32, 3, 3, 3),
        "out_layer.2.bias": (1,),
    }
    return expected


def official_encoder_shapes() -> dict:
    """ckpts/ss_enc_conv3d_16l8_fp16: 74 tensors; stride-2 kernel-2 downsamplers; mean and logvar from one conv."""
    return {
        "input_layer.weight": (32, 1, 3, 3, 3),
        "input_layer.bias": (32,),
        **resblock("blocks.0", 32),
        **resblock("blocks.1", 32),
        "blocks.2.conv.weight": (128, 32, 2, 2, 2),
        "blocks.2.conv.bias": (128,),
        **resblock("blocks.3", 128),
        **resblock("blocks.4", 128),
        "blocks.5.conv.weight": (512, 128, 2, 2, 2),
        "blocks.5.conv.bias": (512,),
        **resblock("blocks.6", 512),
        **resblock("blocks.7", 512),
        **resblock("middle_block.0", 512),
        **resblock("middle_block.1", 512),
        "out_layer.0.weight": (512,),
        "out_layer.0.bias": (512,),
        "out_layer.2.weight": (16, 512, 3, 3, 3),
        "out_layer.2.bias": (16,),
    }


def test_official_sparse_structure_encoder_args_give_the_official_state_dict():
    model = build_model(
        {"name": "SparseStructureEncoder", "args": OFFICIAL_SPARSE_STRUCTURE_ENCODER_ARGS}, device="meta"
    )
    assert shapes(model) == official_encoder_shapes()
    assert len(shapes(model)) == 74 and sum(p.numel() for p in model.parameters()) == pytest.approx(59.3e6, rel=0.01)


def test_official_sparse_structure_flow_args_give_the_official_state_dict():
    model = build_model(
        {"name": "SparseStructureFlowModel", "args": OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS}, device="meta"
    )
    assert shapes(model) == official_flow_shapes()


def test_official_sparse_structure_decoder_args_give_the_official_state_dict():
    model = build_model(
        {"name": "SparseStructureDecoder", "args": OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS}, device="meta"
    )
    assert shapes(model) == official_decoder_shapes()


def sparse_res_block(prefix: str, channels: int, out: int, emb: int = 1024) -> dict:
    """structured_latent_flow.SparseResBlock3d: norm1 affine, norm2 not; spconv SubMConv3d weights
    (out, 3, 3, 3, in) under conv*.conv; a SparseLinear skip only when the width changes; the
    SparseDownsample / SparseUpsample it may hold (`updown`) has no parameters."""
    expected = {
        f"{prefix}.norm1.weight": (channels,),
        f"{prefix}.norm1.bias": (channels,),
        f"{prefix}.conv1.conv.weight": (out, 3, 3, 3, channels),
        f"{prefix}.conv1.conv.bias": (out,),
        f"{prefix}.conv2.conv.weight": (out, 3, 3, 3, out),
        f"{prefix}.conv2.conv.bias": (out,),
        f"{prefix}.emb_layers.1.weight": (2 * out, emb),
        f"{prefix}.emb_layers.1.bias": (2 * out,),
    }
    if channels != out:
        expected[f"{prefix}.skip_connection.weight"] = (out, channels)
        expected[f"{prefix}.skip_connection.bias"] = (out,)
    return expected


def official_slat_flow_shapes(width=1024, cond=1024, blocks=24, heads=16, mlp=4096, io=128, channels=8) -> dict:
    """SLatFlowModel(resolution=64, patch_size=2, io_block_channels=[128], num_io_res_blocks=2, skip
    connections on): no pos_emb entry (AbsolutePositionEmbedder keeps its frequencies as a plain
    attribute, neither parameter nor buffer); one 128-wide res-block, then one pooling 2x and widening
    to 1024; on the way out one unpooling block reading 1024 + 1024 skip channels, then one reading
    128 + 128."""
    expected = {
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "input_layer.weight": (io, channels),
        "input_layer.bias": (io,),
        **sparse_res_block("input_blocks.0", io, io),
        **sparse_res_block("input_blocks.1", io, width),
        **sparse_res_block("out_blocks.0", 2 * width, io),
        **sparse_res_block("out_blocks.1", 2 * io, io),
        "out_layer.weight": (channels, io),
        "out_layer.bias": (channels,),
    }
    for i in range(blocks):
        expected.update(
            {f"blocks.{i}.{key}": shape for key, shape in modulated_cross_block(width, cond, heads, mlp).items()}
        )
    return expected


def subdivide_block(prefix: str, channels: int, out: int) -> dict:
    """decoder_mesh.SparseSubdivideBlock3d: GroupNorm32(32) affine + SiLU, subdivide (no parameters),
    conv 3^3, GroupNorm32, SiLU, conv 3^3; a 1^3 spconv conv as skip since the width changes."""
    return {
        f"{prefix}.act_layers.0.weight": (channels,),
        f"{prefix}.act_layers.0.bias": (channels,),
        f"{prefix}.out_layers.0.conv.weight": (out, 3, 3, 3, channels),
        f"{prefix}.out_layers.0.conv.bias": (out,),
        f"{prefix}.out_layers.1.weight": (out,),
        f"{prefix}.out_layers.1.bias": (out,),
        f"{prefix}.out_layers.3.conv.weight": (out, 3, 3, 3, out),
        f"{prefix}.out_layers.3.conv.bias": (out,),
        f"{prefix}.skip_connection.conv.weight": (out, 1, 1, 1, channels),
        f"{prefix}.skip_connection.conv.bias": (out,),
    }


def official_slat_mesh_decoder_shapes(width=768, blocks=12, mlp=3072, latent=8) -> dict:
    """SLatMeshDecoder(model_channels=768, num_blocks=12, attn_mode="swin", use_color=True): no pos_emb
    entry; SparseTransformerBlocks with non-affine norms and no RMS norms; upsample 768 -> 192 -> 96;
    out_layer to FlexiCubes' 101 channels per cube: sdf 8 + deform 8 x 3 + weights 21 + colour 8 x 6
    (the mesh extractor is a plain object, not a module: nothing of it is in the state dict)."""
    expected = {
        "input_layer.weight": (width, latent),
        "input_layer.bias": (width,),
        **subdivide_block("upsample.0", width, width // 4),
        **subdivide_block("upsample.1", width // 4, width // 8),
        "out_layer.weight": (8 + 8 * 3 + 21 + 8 * 6, width // 8),
        "out_layer.bias": (101,),
    }
    for i in range(blocks):
        block = {
            "attn.to_qkv.weight": (3 * width, width),
            "attn.to_qkv.bias": (3 * width,),
            "attn.to_out.weight": (width, width),
            "attn.to_out.bias": (width,),
            "mlp.mlp.0.weight": (mlp, width),
            "mlp.mlp.0.bias": (mlp,),
            "mlp.mlp.2.weight": (width, mlp),
            "mlp.mlp.2.bias": (width,),
        }
        expected.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return expected


def test_official_slat_flow_args_give_the_official_state_dict():
    model = build_model({"name": "SLatFlowModel", "args": OFFICIAL_SLAT_FLOW_ARGS}, device="meta")
    assert shapes(model) == official_slat_flow_shapes()


def test_official_slat_mesh_decoder_args_give_the_official_state_dict():
    model = build_model({"name": "SLatMeshDecoder", "args": OFFICIAL_SLAT_MESH_DECODER_ARGS}, device="meta")
    assert shapes(model) == official_slat_mesh_decoder_shapes()


def test_official_slat_models_hold_no_buffers():
    """TRELLIS's stage-2 models register no buffers, so a state dict is exactly their parameters."""
    for name, args in (
        ("SLatFlowModel", OFFICIAL_SLAT_FLOW_ARGS),
        ("SLatMeshDecoder", OFFICIAL_SLAT_MESH_DECODER_ARGS),
    ):
        assert list(build_model({"name": name, "args": args}, device="meta").buffers()) == []


# Kernel offsets (a, b, c) of a 3^3 kernel, as a few cases: the centre, one per axis, a corner.
KERNEL_INDICES = [(1, 1, 1), (2, 1, 1), (1, 0, 1), (1, 1, 2), (0, 2, 0)]


@pytest.mark.parametrize("index", KERNEL_INDICES)
def test_submanifold_conv_weight_at_a_kernel_index_reads_the_neighbour_at_that_offset(index):
    """spconv's convention, which the released weights were trained under: SubMConv3d's weight is KRSC,
    (out, kx, ky, kz, in), and weight[:, a, b, c, :] multiplies the input voxel at
    [x, y, z] + (a, b, c) - k // 2 of output voxel [x, y, z], the kernel axes following the coordinate
    columns (TRELLIS hands its [batch, x, y, z] coords to spconv as they are). That is a cross-correlation
    like F.conv3d, no kernel flip: spconv's own tests compare SparseConv3d with nn.Conv3d whose weight is
    the spconv one only permuted, and its submanifold pair generation looks the input up at
    output - padding + offset with padding k // 2. Here only one kernel index is non-zero (an identity),
    so each voxel must receive exactly the features of its neighbour at that offset, not of the one
    at the opposite offset."""
    offset = torch.tensor(index) - 1
    centre = torch.tensor([4, 4, 4])
    sites = [centre, centre + offset, centre - offset, centre + 2 * offset]  # the two ends of a line through the centre
    coords = torch.unique(torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), s]) for s in sites]), dim=0).int()
    feats = torch.arange(coords.shape[0] * 2, dtype=torch.float32).reshape(-1, 2) + 1  # distinct, non-zero
    conv = sp.SparseConv3d(2, 2, 3)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[:, index[0], index[1], index[2], :] = torch.eye(2)
    out = conv(sp.SparseTensor(feats, coords)).feats
    rows = {tuple(c[1:].tolist()): i for i, c in enumerate(coords)}
    for site, row in rows.items():
        neighbour = rows.get(tuple((torch.tensor(site) + offset).tolist()))
        expected = feats[neighbour] if neighbour is not None else torch.zeros(2)
        torch.testing.assert_close(out[row], expected)


def test_pointwise_conv_reads_its_weight_memory_as_an_in_by_out_matrix():
    """spconv >= 2.2 computes a 1x1x1 SubMConv3d as `features @ weight.view(in_channels, out_channels)`
    on its (out, 1, 1, 1, in) parameter (the layout is KRSC, but this path reads the memory as (in, out);
    spconv issue #450). The mesh decoder's subdivision skip connections (768 -> 192, 192 -> 96) are such
    convs, so the released weights only give TRELLIS's function when read the same way.
    Here in = 2, out = 3, weight memory 0..5: spconv's matrix is [[0, 1, 2], [3, 4, 5]], so the
    features [1, 10] map to [30, 41, 52] (plus the bias), not to [10, 32, 54] as the (out, in) reading
    [[0, 1], [2, 3], [4, 5]] would give."""
    conv = sp.SparseConv3d(2, 3, 1)
    with torch.no_grad():
        conv.conv.weight.copy_(torch.arange(6.0).reshape(3, 1, 1, 1, 2))
        conv.conv.bias.copy_(torch.tensor([0.5, -0.5, 1.0]))
    x = sp.SparseTensor(torch.tensor([[1.0, 10.0]]), torch.tensor([[0, 3, 3, 3]], dtype=torch.int32))
    torch.testing.assert_close(conv(x).feats, torch.tensor([[30.5, 40.5, 53.0]]))
