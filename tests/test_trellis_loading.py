"""Loading a TRELLIS release-layout checkpoint: round trip, strictness, pipeline.json, s3://."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gap3d import storage
from gap3d.trellis.config import STAGE1_MODELS, PipelineConfig
from gap3d.trellis.loading import CheckpointMismatchError, load_model, load_pipeline
from miniature.checkpoints.trellis import tiny_model_specs, write_tiny_trellis


@pytest.fixture(scope="module")
def pristine_dir(tmp_path_factory):
    return write_tiny_trellis(tmp_path_factory.mktemp("trellis") / "tiny", cond_dim=16)


@pytest.fixture
def tiny_dir(pristine_dir, tmp_path):
    """A private copy each test may damage."""
    return Path(shutil.copytree(pristine_dir, tmp_path / "tiny"))


def weights_path(root, name):
    return root / f"{tiny_model_specs()[name].stem}.safetensors"


def test_factory_writes_the_release_layout(tiny_dir):
    pipeline = json.loads((tiny_dir / "pipeline.json").read_text())
    assert pipeline["name"] == "TrellisImageTo3DPipeline"
    for name in STAGE1_MODELS:
        stem = pipeline["args"]["models"][name]
        assert stem.startswith("ckpts/")
        assert json.loads((tiny_dir / f"{stem}.json").read_text()).keys() == {"name", "args"}
        assert (tiny_dir / f"{stem}.safetensors").is_file()


def test_loader_rebuilds_the_written_weights_exactly(tiny_dir):
    _, models = load_pipeline(str(tiny_dir), STAGE1_MODELS)
    for name, model in models.items():
        saved = load_file(str(weights_path(tiny_dir, name)))
        loaded = model.state_dict()
        assert loaded.keys() == saved.keys()
        for key in saved:
            torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)


def test_renamed_tensor_fails_naming_missing_and_unexpected_keys(tiny_dir):
    path = weights_path(tiny_dir, "sparse_structure_flow_model")
    state = load_file(str(path))
    state["input_layer.weights"] = state.pop("input_layer.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as error:
        load_model(tiny_dir, tiny_model_specs()["sparse_structure_flow_model"].stem)
    assert "missing key input_layer.weight" in str(error.value)
    assert "unexpected key input_layer.weights" in str(error.value)


def test_reshaped_tensor_fails_naming_the_key_and_both_shapes(tiny_dir):
    path = weights_path(tiny_dir, "sparse_structure_decoder")
    state = load_file(str(path))
    state["out_layer.2.bias"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(
        CheckpointMismatchError, match=r"shape conflict at out_layer.2.bias: checkpoint \(2,\), model \(1,\)"
    ):
        load_model(tiny_dir, tiny_model_specs()["sparse_structure_decoder"].stem)


def test_missing_weights_file_names_the_file(tiny_dir):
    weights_path(tiny_dir, "sparse_structure_decoder").unlink()
    with pytest.raises(FileNotFoundError, match="ss_dec_conv3d_tiny.safetensors"):
        load_pipeline(str(tiny_dir), STAGE1_MODELS)


def test_unknown_model_class_is_reported(tiny_dir):
    stem = tiny_model_specs()["sparse_structure_decoder"].stem
    (tiny_dir / f"{stem}.json").write_text(json.dumps({"name": "SparseStructureMagic", "args": {}}))
    with pytest.raises(ValueError, match="unknown TRELLIS model class 'SparseStructureMagic'"):
        load_model(tiny_dir, stem)


def test_pipeline_without_a_stage1_model_is_rejected(tiny_dir):
    config = json.loads((tiny_dir / "pipeline.json").read_text())
    del config["args"]["models"]["sparse_structure_decoder"]
    (tiny_dir / "pipeline.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sparse_structure_decoder"):
        PipelineConfig.load(tiny_dir)


def test_release_pipeline_json_is_parsed(tmp_path):
    # Sampler blocks as the TRELLIS-image-large pipeline.json writes them.
    def entry(strength):
        return {
            "name": "FlowEulerGuidanceIntervalSampler",
            "args": {"sigma_min": 1e-5},
            "params": {"steps": 25, "cfg_strength": strength, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0},
        }

    args = {
        "models": {name: f"ckpts/{name}" for name in STAGE1_MODELS},
        "sparse_structure_sampler": entry(7.5),
        "slat_sampler": entry(3.0),
        "slat_normalization": {"mean": [0.5], "std": [2.0]},
        "image_cond_model": "dinov2_vitl14_reg",
    }
    (tmp_path / "pipeline.json").write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": args}))
    config = PipelineConfig.load(tmp_path)
    sampler = config.sparse_structure_sampler
    assert (sampler.steps, sampler.cfg_strength, sampler.cfg_interval, sampler.rescale_t, sampler.sigma_min) == (
        25,
        7.5,
        (0.5, 1.0),
        3.0,
        1e-5,
    )
    assert config.slat_sampler.cfg_strength == 3.0
    assert config.slat_normalization == {"mean": [0.5], "std": [2.0]}
    assert config.models["sparse_structure_flow_model"] == "ckpts/sparse_structure_flow_model"


def test_loads_from_s3(tiny_dir, s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))
    storage.upload_dir(tiny_dir, f"{s3_bucket}/trellis-tiny")
    pipeline, models = load_pipeline(f"{s3_bucket}/trellis-tiny", STAGE1_MODELS)
    assert pipeline.sparse_structure_sampler.cfg_interval == (0.5, 1.0)
    expected = load_file(str(weights_path(tiny_dir, "sparse_structure_decoder")))
    torch.testing.assert_close(
        models["sparse_structure_decoder"].state_dict()["out_layer.2.weight"], expected["out_layer.2.weight"]
    )
