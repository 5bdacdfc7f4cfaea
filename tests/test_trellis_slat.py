"""Stage 2 of the TRELLIS decoder: structured-latent flow, mesh decoder, mesh extraction, end to end."""

import math

import numpy as np
import pytest
import torch
import trimesh

from gap3d.trellis.config import SamplerConfig
from gap3d.trellis.loading import build_model
from gap3d.trellis.mesh_extraction import cube_feature_channels, extract_mesh
from gap3d.trellis.sampler import FlowEulerSampler
from gap3d.trellis.sparse import SparseTensor
from gap3d.trellis.structured_latent_decoder import SLatMeshDecoder, SLatMeshDecoderConfig
from gap3d.trellis.structured_latent_flow import SLatFlowConfig, SLatFlowModel, sample_structured_latent
from miniature.checkpoints.trellis import TINY_SLAT_FLOW_ARGS, TINY_SLAT_MESH_DECODER_ARGS

# args of the released ckpts/slat_flow_img_dit_L_64l8p2_fp16.json and slat_dec_mesh_swin8_B_64l8m256c_fp16.json
RELEASED_FLOW = {
    "name": "SLatFlowModel",
    "args": {
        "resolution": 64,
        "in_channels": 8,
        "out_channels": 8,
        "model_channels": 1024,
        "cond_channels": 1024,
        "num_blocks": 24,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 2,
        "num_io_res_blocks": 2,
        "io_block_channels": [128],
        "pe_mode": "ape",
        "qk_rms_norm": True,
        "use_fp16": True,
    },
}
RELEASED_MESH_DECODER = {
    "name": "SLatMeshDecoder",
    "args": {
        "resolution": 64,
        "model_channels": 768,
        "latent_channels": 8,
        "num_blocks": 12,
        "num_heads": 12,
        "mlp_ratio": 4,
        "attn_mode": "swin",
        "window_size": 8,
        "use_fp16": True,
        "representation_config": {"use_color": True},
    },
}
COND_CHANNELS = TINY_SLAT_FLOW_ARGS["cond_channels"]
IDENTITY_NORMALIZATION = {"mean": [0.0] * 8, "std": [1.0] * 8}


def randomized(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Replace TRELLIS's zero-initialised layers by random weights so outputs depend on every part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def shell_coords(batch_size: int = 1, res: int = 16, radius: float = 4.0) -> torch.Tensor:
    """(M, 4) voxels of a spherical shell per batch element."""
    axis = torch.arange(res)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    shell = grid[((grid.float() - (res - 1) / 2).norm(dim=1) - radius).abs() < 0.8]
    return torch.cat([torch.cat([torch.full((shell.shape[0], 1), b), shell], dim=1) for b in range(batch_size)]).int()


@pytest.fixture(scope="module")
def tiny_flow() -> SLatFlowModel:
    return randomized(SLatFlowModel(SLatFlowConfig(**TINY_SLAT_FLOW_ARGS)))


@pytest.fixture(scope="module")
def tiny_decoder() -> SLatMeshDecoder:
    return randomized(SLatMeshDecoder(SLatMeshDecoderConfig(**TINY_SLAT_MESH_DECODER_ARGS)), seed=1, std=0.03)


def tiny_sampler(steps: int = 2) -> FlowEulerSampler:
    return FlowEulerSampler(SamplerConfig(steps=steps, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0))


def test_released_flow_architecture_has_trellis_keys_and_shapes():
    model = build_model(RELEASED_FLOW, device="meta")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = {
        "t_embedder.mlp.0.weight": (1024, 256),
        "input_layer.weight": (128, 8),
        "input_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 128),
        "input_blocks.1.conv2.conv.weight": (1024, 3, 3, 3, 1024),
        "input_blocks.1.skip_connection.weight": (1024, 128),
        "input_blocks.1.emb_layers.1.weight": (2048, 1024),
        "blocks.23.self_attn.q_rms_norm.gamma": (16, 64),
        "blocks.23.cross_attn.to_kv.weight": (2048, 1024),
        "blocks.23.norm2.weight": (1024,),
        "blocks.23.adaLN_modulation.1.weight": (6144, 1024),
        "out_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 2048),
        "out_blocks.0.skip_connection.weight": (128, 2048),
        "out_blocks.1.conv1.conv.weight": (128, 3, 3, 3, 256),
        "out_layer.weight": (8, 128),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert len(shapes) == 526 and "blocks.24.norm2.weight" not in shapes
    # 600,432,520 parameters: the released 1,203,755,136-byte safetensors once its fp32 norms,
    # timestep MLP and I/O layers (TRELLIS converts only the torso's linears/convs to fp16) are counted
    assert sum(math.prod(shape) for shape in shapes.values()) == 600_432_520


def test_released_mesh_decoder_architecture_has_trellis_keys_and_shapes():
    model = build_model(RELEASED_MESH_DECODER, device="meta")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = {
        "input_layer.weight": (768, 8),
        "blocks.11.attn.to_qkv.weight": (2304, 768),
        "blocks.11.mlp.mlp.2.weight": (768, 3072),
        "upsample.0.act_layers.0.weight": (768,),
        "upsample.0.out_layers.0.conv.weight": (192, 3, 3, 3, 768),
        "upsample.0.out_layers.1.weight": (192,),
        "upsample.0.out_layers.3.conv.weight": (192, 3, 3, 3, 192),
        "upsample.0.skip_connection.conv.weight": (192, 1, 1, 1, 768),
        "upsample.1.out_layers.3.conv.weight": (96, 3, 3, 3, 96),
        "out_layer.weight": (101, 96),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert len(shapes) == 120
    assert sum(math.prod(shape) for shape in shapes.values()) == 90_926_693


def test_mesh_decoder_config_rejects_widths_its_group_norms_cannot_split():
    with pytest.raises(ValueError, match="multiple of 256"):
        SLatMeshDecoderConfig(**{**TINY_SLAT_MESH_DECODER_ARGS, "model_channels": 128})


def test_flow_config_rejects_patch_size_without_io_blocks():
    with pytest.raises(ValueError, match="io_block_channels"):
        SLatFlowConfig(**{**TINY_SLAT_FLOW_ARGS, "io_block_channels": None})


def test_tiny_flow_predicts_a_velocity_on_the_input_voxels(tiny_flow):
    coords = shell_coords(batch_size=2)
    x = SparseTensor(torch.randn(coords.shape[0], 8), coords)
    with torch.no_grad():
        velocity = tiny_flow(x, torch.tensor([1000.0, 500.0]), torch.randn(2, 7, COND_CHANNELS))
    assert torch.equal(velocity.coords, coords)
    assert velocity.feats.shape == (coords.shape[0], 8) and torch.isfinite(velocity.feats).all()


def test_tiny_flow_treats_batch_elements_independently(tiny_flow):
    first, second = shell_coords(radius=4.0), shell_coords(radius=6.0)
    second[:, 0] = 1
    coords = torch.cat([first, second])
    x = SparseTensor(torch.randn(coords.shape[0], 8, generator=torch.Generator().manual_seed(0)), coords)
    t, cond = torch.tensor([700.0, 300.0]), torch.randn(2, 5, COND_CHANNELS)
    with torch.no_grad():
        batched = tiny_flow(x, t, cond).feats
        for b, rows in enumerate(x.layout):
            alone = x.coords[rows].clone()
            alone[:, 0] = 0
            single = tiny_flow(SparseTensor(x.feats[rows], alone), t[b : b + 1], cond[b : b + 1]).feats
            torch.testing.assert_close(batched[rows], single, rtol=1e-4, atol=1e-5)


def test_tiny_mesh_decoder_outputs_cube_features_at_four_times_the_resolution(tiny_decoder):
    coords = shell_coords()[:20]
    with torch.no_grad():
        cubes = tiny_decoder(SparseTensor(torch.randn(20, 8), coords))
    assert cubes.feats.shape == (20 * 64, cube_feature_channels(use_color=True)) == (1280, 101)
    parents = torch.unique(torch.div(cubes.coords[:, 1:], 4, rounding_mode="floor"), dim=0)
    assert torch.equal(parents, torch.unique(coords[:, 1:], dim=0))


def test_mesh_extraction_recovers_a_sphere_from_its_sdf():
    res, radius = 32, 0.3
    axis = torch.arange(res)
    cubes = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    corners = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]])
    sdf = ((cubes[:, None] + corners[None]).float() / res - 0.5).norm(dim=-1) * res - radius * res  # (N, 8) voxels
    keep = (sdf < 2).any(dim=1)  # the shell and the interior, as the sparse structure would cover them
    feats = torch.zeros(int(keep.sum()), cube_feature_channels(use_color=True))
    feats[:, :8] = sdf[keep]
    feats[:, 53:] = 0.8  # colour channels
    mesh = extract_mesh(cubes[keep], feats, res, use_color=True)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)  # positive: normals point out
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), radius, atol=0.01)
    assert (mesh.visual.vertex_colors[:, :3] == 204).all()


def test_mesh_extraction_of_an_all_outside_field_is_empty():
    coords = torch.tensor([[3, 3, 3], [3, 3, 4]])
    feats = torch.ones(2, cube_feature_channels(use_color=False))
    assert len(extract_mesh(coords, feats, 8, use_color=False).faces) == 0


def run_stage2(flow, decoder, coords, seed, steps=2):
    cond = torch.randn(int(coords[:, 0].max()) + 1, 5, COND_CHANNELS, generator=torch.Generator().manual_seed(123))
    generator = torch.Generator().manual_seed(seed)
    latent = sample_structured_latent(flow, tiny_sampler(steps), coords, cond, IDENTITY_NORMALIZATION, generator)
    return latent, decoder.decode(latent)


def test_stage2_turns_a_handful_of_voxels_into_a_coloured_mesh(tiny_flow, tiny_decoder):
    coords = torch.tensor(
        [[0, 7, 7, 7], [0, 7, 7, 8], [0, 7, 8, 7], [0, 8, 7, 7], [0, 8, 8, 8], [0, 6, 7, 7]], dtype=torch.int32
    )
    _, meshes = run_stage2(tiny_flow, tiny_decoder, coords, seed=0)
    assert len(meshes) == 1
    mesh = meshes[0]
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) > 0
    assert mesh.vertices.min() >= -0.5 and mesh.vertices.max() <= 0.5
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)


def test_stage2_is_deterministic_for_a_seed(tiny_flow, tiny_decoder):
    coords = shell_coords()[:12]
    latent_a, meshes_a = run_stage2(tiny_flow, tiny_decoder, coords, seed=7)
    latent_b, meshes_b = run_stage2(tiny_flow, tiny_decoder, coords, seed=7)
    latent_c, _ = run_stage2(tiny_flow, tiny_decoder, coords, seed=8)
    assert torch.equal(latent_a.feats, latent_b.feats)
    np.testing.assert_array_equal(meshes_a[0].vertices, meshes_b[0].vertices)
    np.testing.assert_array_equal(meshes_a[0].faces, meshes_b[0].faces)
    assert not torch.equal(latent_a.feats, latent_c.feats)


def test_stage2_applies_slat_normalization(tiny_flow):
    coords = shell_coords()[:10]
    cond = torch.randn(1, 5, COND_CHANNELS)
    mean, std = [float(i) for i in range(8)], [0.5 + i for i in range(8)]

    def sample(normalization):
        generator = torch.Generator().manual_seed(3)
        return sample_structured_latent(tiny_flow, tiny_sampler(), coords, cond, normalization, generator).feats

    torch.testing.assert_close(
        sample({"mean": mean, "std": std}), sample(None) * torch.tensor(std) + torch.tensor(mean)
    )


def test_stage2_with_no_voxels_raises_a_clear_error(tiny_flow):
    with pytest.raises(ValueError, match="sparse structure from stage 1 is empty"):
        sample_structured_latent(
            tiny_flow, tiny_sampler(), torch.zeros(0, 4, dtype=torch.int32), torch.randn(1, 5, COND_CHANNELS), None
        )
