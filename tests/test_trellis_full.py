"""Decoder stage "full" on the tiny preset: stage 1 -> voxels -> structured latent -> coloured mesh -> GLB."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gap3d.trellis.config import STAGE1_MODELS, STAGE2_MODELS
from gap3d.trellis.decoder import Decoder, EmptyStructureError, SparseStructure
from gap3d.trellis.loading import CheckpointMismatchError, load_pipeline
from gap3d.trellis.mesh_export import load_mesh
from miniature.checkpoints.trellis import tiny_stage2_specs, write_tiny_trellis

COND_DIM = 16


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return write_tiny_trellis(tmp_path_factory.mktemp("trellis") / "tiny", cond_dim=COND_DIM, steps=2)


@pytest.fixture(scope="module")
def decoder(tiny_root) -> Decoder:
    return Decoder.from_pretrained(str(tiny_root), device="cpu")


@pytest.fixture
def tiny_copy(tiny_root, tmp_path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(tiny_root, tmp_path / "tiny"))


def conditions(batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 33, COND_DIM, generator=torch.Generator().manual_seed(seed))


def blob_structure(centres: list[tuple[int, int, int]], seeds: list[int], radius: float = 4.0) -> SparseStructure:
    """A stage-1 result with one ball of voxels per sample (an empty grid where the centre is None)."""
    axis = torch.arange(64, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (64, 64, 64, 3)
    logits = [
        torch.full((64, 64, 64), -1.0) if centre is None else radius - (grid - torch.tensor(centre)).norm(dim=-1)
        for centre in centres
    ]
    return SparseStructure(logits=torch.stack(logits), seeds=seeds)


def test_full_generate_gives_a_coloured_glb_that_trimesh_loads(decoder):
    assert decoder.default_stage == "full"
    (data,) = decoder.generate_bytes(conditions(1), seed=0)
    mesh = load_mesh(data, "glb")
    assert len(mesh.faces) > 0
    assert mesh.visual.kind == "vertex" and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    assert mesh.bounds.min() >= -0.5 and mesh.bounds.max() <= 0.5


def test_full_stage_is_deterministic_for_a_seed_and_varies_with_it(decoder):
    structure = blob_structure([(30, 30, 30)], seeds=[5])
    first = decoder.full_meshes(conditions(1), structure)[0]
    second = decoder.full_meshes(conditions(1), structure)[0]
    np.testing.assert_array_equal(first.vertices, second.vertices)
    np.testing.assert_array_equal(first.faces, second.faces)
    np.testing.assert_array_equal(first.visual.vertex_colors, second.visual.vertex_colors)
    structure.seeds = [6]
    other = decoder.full_meshes(conditions(1), structure)[0]
    assert other.vertices.shape != first.vertices.shape or not np.array_equal(other.vertices, first.vertices)


def test_a_sample_decoded_in_a_batch_equals_it_decoded_alone(decoder):
    cond = conditions(2)
    batch = decoder.sample_structured_latent(
        cond, [torch.argwhere(torch.ones(3, 3, 3)) + 20, torch.argwhere(torch.ones(4, 2, 3)) + 30], [3, 9]
    )
    alone = decoder.sample_structured_latent(cond[1:], [torch.argwhere(torch.ones(4, 2, 3)) + 30], [9])
    torch.testing.assert_close(batch.feats[27:], alone.feats, rtol=1e-4, atol=1e-5)


def test_full_generate_of_a_batch_matches_each_sample_alone(decoder):
    batch = decoder.generate(conditions(2), seed=[3, 9])
    alone = decoder.generate(conditions(2)[1:], seed=9)
    assert len(batch[1].faces) == len(alone[0].faces) > 0
    np.testing.assert_allclose(batch[1].vertices, alone[0].vertices, atol=1e-4)


def test_splitting_a_batch_by_the_voxel_budget_changes_nothing(tiny_root, decoder):
    structure = blob_structure([(20, 20, 20), (40, 40, 40)], seeds=[1, 2], radius=3.0)
    small_budget = Decoder.from_pretrained(str(tiny_root), device="cpu", max_stage2_voxels=max(structure.num_voxels()))
    together = decoder.full_meshes(conditions(2), structure)
    apart = small_budget.full_meshes(conditions(2), structure)
    for a, b in zip(together, apart):
        assert len(a.faces) == len(b.faces)
        np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-4)


def test_an_empty_structure_in_a_batch_raises_naming_it_or_gives_an_empty_mesh(decoder):
    structure = blob_structure([(30, 30, 30), None], seeds=[4, 11])
    with pytest.raises(EmptyStructureError, match=r"sample 1 \(seed 11\).*empty"):
        decoder.full_meshes(conditions(2), structure)
    meshes = decoder.full_meshes(conditions(2), structure, allow_empty=True)
    assert len(meshes[0].faces) > 0 and len(meshes[1].faces) == 0


def test_an_oversized_structure_is_decoded_from_its_surface_voxels(tiny_root):
    structure = blob_structure([(30, 30, 30)], seeds=[0], radius=4.0)
    total = structure.num_voxels()[0]
    capped = Decoder.from_pretrained(str(tiny_root), device="cpu", max_stage2_voxels=total - 1)
    (mesh,) = capped.full_meshes(conditions(1), structure)
    assert len(mesh.faces) > 0
    tiny_cap = Decoder.from_pretrained(str(tiny_root), device="cpu", max_stage2_voxels=10)
    with pytest.raises(ValueError, match=r"sample 0 \(seed 0\).*max_stage2_voxels=10"):
        tiny_cap.full_meshes(conditions(1), structure)


def test_stage2_sampler_params_override_and_unknown_keys_are_rejected(decoder):
    structure = blob_structure([(30, 30, 30)], seeds=[0], radius=2.0)
    (mesh,) = decoder.full_meshes(conditions(1), structure, slat_sampler_params={"steps": 1, "cfg_strength": 0.0})
    assert len(mesh.faces) > 0
    with pytest.raises(ValueError, match="unknown slat_sampler_params \\['stepz'\\]"):
        decoder.full_meshes(conditions(1), structure, slat_sampler_params={"stepz": 1})


def test_stages_coarse_skips_the_stage2_models(tiny_root):
    decoder = Decoder.from_pretrained(str(tiny_root), device="cpu", stages="coarse")
    assert set(decoder.models) == set(STAGE1_MODELS) and decoder.default_stage == "coarse"


def test_stages_full_on_a_stage1_only_checkpoint_names_the_missing_models(tmp_path):
    root = write_tiny_trellis(tmp_path / "coarse", cond_dim=COND_DIM, steps=1, stage2=False)
    with pytest.raises(ValueError, match="lists no model slat_flow_model, slat_decoder_mesh"):
        Decoder.from_pretrained(str(root), device="cpu", stages="full")


def test_factory_round_trip_loads_the_stage2_weights_exactly(tiny_copy):
    pipeline, models = load_pipeline(str(tiny_copy), STAGE1_MODELS + STAGE2_MODELS)
    assert len(pipeline.slat_normalization["mean"]) == len(pipeline.slat_normalization["std"]) == 8
    for name in STAGE2_MODELS:
        saved = load_file(str(tiny_copy / f"{tiny_stage2_specs()[name].stem}.safetensors"))
        loaded = models[name].state_dict()
        assert loaded.keys() == saved.keys()
        for key in saved:
            torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)


def test_renamed_stage2_tensor_fails_naming_both_keys(tiny_copy):
    path = tiny_copy / f"{tiny_stage2_specs()['slat_flow_model'].stem}.safetensors"
    state = load_file(str(path))
    state["blocks.0.cross_attn.to_kv.weights"] = state.pop("blocks.0.cross_attn.to_kv.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as error:
        Decoder.from_pretrained(str(tiny_copy), device="cpu")
    assert "missing key blocks.0.cross_attn.to_kv.weight" in str(error.value)
    assert "unexpected key blocks.0.cross_attn.to_kv.weights" in str(error.value)


def test_reshaped_stage2_tensor_fails_naming_the_key_and_both_shapes(tiny_copy):
    path = tiny_copy / f"{tiny_stage2_specs()['slat_decoder_mesh'].stem}.safetensors"
    state = load_file(str(path))
    state["out_layer.weight"] = torch.zeros(53, 32)
    save_file(state, str(path))
    with pytest.raises(
        CheckpointMismatchError, match=r"shape conflict at out_layer.weight: checkpoint \(53, 32\), model \(101, 32\)"
    ):
        Decoder.from_pretrained(str(tiny_copy), device="cpu")


def set_stage2_resolution(root, resolution: int, names=("slat_decoder_mesh", "slat_flow_model")) -> None:
    for name in names:
        stem = tiny_stage2_specs()[name].stem
        spec = json.loads((root / f"{stem}.json").read_text())
        spec["args"]["resolution"] = resolution
        (root / f"{stem}.json").write_text(json.dumps(spec))


def test_stage2_models_on_different_grids_are_rejected(tiny_copy):
    set_stage2_resolution(tiny_copy, 32, names=("slat_decoder_mesh",))
    with pytest.raises(ValueError, match="the stage-2 models disagree on their grid"):
        Decoder.from_pretrained(str(tiny_copy), device="cpu")


def test_a_stage2_grid_that_does_not_divide_stage1s_by_a_power_of_two_is_rejected(tiny_copy):
    set_stage2_resolution(tiny_copy, 48)
    with pytest.raises(ValueError, match="stage 1 decodes a 64\\^3 grid; it must be stage 1's, or smaller"):
        Decoder.from_pretrained(str(tiny_copy), device="cpu")


def test_a_coarser_stage2_runs_on_the_structure_max_pooled_to_its_grid(tiny_copy):
    set_stage2_resolution(tiny_copy, 32)
    decoder = Decoder.from_pretrained(str(tiny_copy), device="cpu")
    cond = conditions(1)
    structure = decoder.sample_sparse_structure(cond, seed=0)
    pooled = decoder.stage2_occupancy(structure)
    assert pooled.shape == (1, 32, 32, 32) and decoder.stage2_resolution == 32
    coarse = structure.occupancy.reshape(1, 32, 2, 32, 2, 32, 2).any(dim=(2, 4, 6))  # every 2^3 block with a voxel
    assert torch.equal(pooled, coarse) and pooled.any()
    decoder.full_meshes(cond, structure, allow_empty=True)  # stage 2 runs on the pooled voxels
