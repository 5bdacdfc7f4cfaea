"""Decoder stage 1 on the tiny preset: condition tokens -> stage 1 -> coarse mesh -> GLB/OBJ/PLY bytes."""

import numpy as np
import pytest
import torch

from gap3d.trellis.decoder import Decoder, EmptyStructureError
from gap3d.trellis.mesh_export import export_mesh, load_mesh
from miniature.checkpoints.trellis import write_tiny_trellis

COND_DIM = 16


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    root = write_tiny_trellis(tmp_path_factory.mktemp("trellis") / "tiny", cond_dim=COND_DIM, steps=3, stage2=False)
    return Decoder.from_pretrained(str(root), device="cpu")


def conditions(batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 261, COND_DIM, generator=torch.Generator().manual_seed(seed))


def test_stage1_gives_64_cubed_logits_and_voxel_coordinates(decoder):
    structure = decoder.sample_sparse_structure(conditions(2), seed=0)
    assert structure.logits.shape == (2, 64, 64, 64)
    coords = structure.coords
    assert coords.dtype == torch.int32 and coords.shape == (sum(structure.num_voxels()), 4)
    assert set(coords[:, 0].tolist()) <= {0, 1}
    assert bool((structure.logits[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]] > 0).all())


def test_same_seed_same_structure(decoder):
    first = decoder.sample_sparse_structure(conditions(1), seed=7)
    second = decoder.sample_sparse_structure(conditions(1), seed=7)
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)


def test_different_seeds_differ(decoder):
    first = decoder.sample_sparse_structure(conditions(1), seed=7)
    second = decoder.sample_sparse_structure(conditions(1), seed=8)
    assert not torch.equal(first.logits, second.logits)


def test_a_batched_sample_equals_the_same_sample_run_alone(decoder):
    batch = decoder.sample_sparse_structure(conditions(2), seed=[3, 9])
    alone = decoder.sample_sparse_structure(conditions(2)[1:], seed=9)
    torch.testing.assert_close(batch.logits[1:], alone.logits, atol=1e-4, rtol=1e-4)


def test_generate_gives_a_glb_that_trimesh_loads_with_faces(decoder):
    (data,) = decoder.generate_bytes(conditions(1), seed=0, file_format="glb", allow_empty=False)
    mesh = load_mesh(data, "glb")
    assert len(mesh.faces) > 0
    assert mesh.bounds.min() >= -0.5 - 1e-6 and mesh.bounds.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("file_format", ["obj", "ply"])
def test_meshes_round_trip_through_obj_and_ply(decoder, file_format):
    (mesh,) = decoder.generate(conditions(1), seed=1)
    loaded = load_mesh(export_mesh(mesh, file_format, target_faces=None), file_format)
    assert len(loaded.faces) == len(mesh.faces)


def test_coarse_mesh_is_watertight(decoder):
    (mesh,) = decoder.generate(conditions(1), seed=2)
    assert mesh.is_watertight


def test_empty_structure_raises_a_clear_error_or_gives_an_empty_mesh(decoder):
    structure = decoder.sample_sparse_structure(conditions(1), seed=0)
    structure.logits = torch.full_like(structure.logits, -1.0)
    with pytest.raises(EmptyStructureError, match="sample 0 \\(seed 0\\).*empty"):
        decoder.coarse_meshes(structure)
    (mesh,) = decoder.coarse_meshes(structure, allow_empty=True)
    assert len(mesh.faces) == 0
    with pytest.raises(ValueError, match="empty mesh"):
        export_mesh(mesh)


def test_fully_occupied_structure_meshes_to_the_box(decoder):
    structure = decoder.sample_sparse_structure(conditions(1), seed=0)
    structure.logits = torch.ones_like(structure.logits)
    (mesh,) = decoder.coarse_meshes(structure)
    assert mesh.is_watertight
    # Outermost crossing: a third of the way (pad logit -2 vs +1) from the last voxel centre,
    # 0.5 - 1/128, towards the padding centre 1/64 further out: 0.5 - 1/128 + 1/192 = 0.5 - 1/384.
    np.testing.assert_allclose(mesh.bounds, [[-0.5 + 1 / 384] * 3, [0.5 - 1 / 384] * 3], atol=1e-6)


def test_condition_of_the_wrong_width_is_rejected(decoder):
    with pytest.raises(ValueError, match=f"\\(B, N, {COND_DIM}\\)"):
        decoder.generate(torch.zeros(1, 261, COND_DIM + 1))


def test_a_stage1_only_checkpoint_defaults_to_coarse_and_refuses_full_naming_the_models(decoder):
    assert decoder.default_stage == "coarse"
    with pytest.raises(ValueError, match="stage 'full' needs the stage-2 models slat_flow_model, slat_decoder_mesh"):
        decoder.generate(conditions(1), stage="full")


def test_unknown_export_format_is_rejected(decoder):
    (mesh,) = decoder.generate(conditions(1), seed=1)
    with pytest.raises(ValueError, match="stl"):
        export_mesh(mesh, "stl")


def test_simplification_reduces_faces_to_the_target(decoder):
    (mesh,) = decoder.generate(conditions(1), seed=1)
    simplified = load_mesh(export_mesh(mesh, "glb", target_faces=500))
    assert 0 < len(simplified.faces) <= 550
