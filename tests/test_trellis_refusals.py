"""Loading refuses what it would compute differently from TRELLIS's own classes, naming the argument; what the port
does compute, it computes as they do (issue 32 item 5)."""

import json
import shutil

import pytest
import torch

from gap3d.trellis import Decoder
from gap3d.trellis.config import TEXT_PIPELINE, PipelineConfig
from gap3d.trellis.sparse_structure_decoder import (
    ChannelLayerNorm32,
    GroupNorm32,
    SparseStructureDecoder,
    SparseStructureDecoderConfig,
)
from gap3d.trellis.sparse_structure_encoder import SparseStructureEncoder, SparseStructureEncoderConfig
from miniature.checkpoints.trellis import write_tiny_trellis

COND_DIM = 16


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_trellis(tmp_path_factory.mktemp("trellis") / "tiny", cond_dim=COND_DIM, stage2=False)


def edited_release(release, tmp_path, edit):
    """A copy of the release whose pipeline.json `edit` changed in place."""
    root = shutil.copytree(release, tmp_path / "edited")
    spec = json.loads((root / "pipeline.json").read_text())
    edit(spec)
    (root / "pipeline.json").write_text(json.dumps(spec))
    return root


def decoder_pair(norm_type: str) -> tuple[SparseStructureDecoder, SparseStructureDecoder]:
    """A decoder of `norm_type` and a layer-norm one holding the same weights (their state dicts have one shape)."""
    config = dict(out_channels=1, latent_channels=4, num_res_blocks=1, channels=[32, 32], num_res_blocks_middle=1)
    torch.manual_seed(0)
    chosen = SparseStructureDecoder(SparseStructureDecoderConfig(**config, norm_type=norm_type))
    for parameter in chosen.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    layer = SparseStructureDecoder(SparseStructureDecoderConfig(**config, norm_type="layer"))
    layer.load_state_dict(chosen.state_dict())
    return chosen.eval(), layer.eval()


def test_a_group_norm_vae_keeps_layer_norm_in_its_blocks_as_trellis_does():
    decoder, _ = decoder_pair("group")
    encoder = SparseStructureEncoder(
        SparseStructureEncoderConfig(1, 4, 1, [32, 32], num_res_blocks_middle=1, norm_type="group")
    )
    for model in (decoder, encoder):
        block_norms = {type(m) for block in [*model.blocks, *model.middle_block] for m in block.modules()}
        assert GroupNorm32 not in block_norms and ChannelLayerNorm32 in block_norms
        assert isinstance(model.out_layer[0], GroupNorm32)


def test_a_group_norm_decoder_differs_from_a_layer_norm_one_only_in_its_output_norm():
    group, layer = decoder_pair("group")
    z = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torso = layer.input_layer(z)
        torso = layer.middle_block(torso)
        for block in layer.blocks:
            torso = block(torso)
        expected = group.out_layer[2](torch.nn.functional.silu(group.out_layer[0](torso)))
        torch.testing.assert_close(group(z), expected)


def test_a_group_norm_output_needs_a_width_its_32_groups_divide():
    with pytest.raises(ValueError, match="norm_type 'group' needs a last width divisible by 32"):
        SparseStructureDecoderConfig(1, 4, 1, [64, 16], norm_type="group")


def test_a_pipeline_argument_the_port_does_not_compute_is_refused_by_name(release, tmp_path):
    root = edited_release(release, tmp_path, lambda spec: spec["args"].update(ss_guidance_rescale=0.7))
    with pytest.raises(ValueError, match="args ss_guidance_rescale are not computed by this port of TRELLIS"):
        Decoder.from_pretrained(str(root), device="cpu")


def test_an_unknown_pipeline_class_is_refused_by_name(release, tmp_path):
    root = edited_release(release, tmp_path, lambda spec: spec.update(name="TrellisImageTo3DPipelineV2"))
    with pytest.raises(ValueError, match="pipeline.json name 'TrellisImageTo3DPipelineV2' is not supported"):
        Decoder.from_pretrained(str(root), device="cpu")


def text_release(release, tmp_path):
    def to_text(spec):
        spec["name"] = TEXT_PIPELINE
        spec["args"]["text_cond_model"] = "openai/clip-vit-large-patch14"

    return edited_release(release, tmp_path, to_text)


def test_a_text_release_is_refused_without_its_empty_caption_condition(release, tmp_path):
    with pytest.raises(ValueError, match="guides with the empty caption encoded by openai/clip-vit-large-patch14"):
        Decoder.from_pretrained(str(text_release(release, tmp_path)), device="cpu")


def test_a_text_release_round_trips_its_encoder_name(release, tmp_path):
    pipeline = PipelineConfig.load(text_release(release, tmp_path))
    assert (pipeline.name, pipeline.text_cond_model) == (TEXT_PIPELINE, "openai/clip-vit-large-patch14")
    assert pipeline.to_json()["args"]["text_cond_model"] == "openai/clip-vit-large-patch14"


def test_the_negative_condition_replaces_zeros_in_guidance(release):
    cond = torch.randn(2, 7, COND_DIM, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(1, 7, COND_DIM)
    other = torch.randn(1, 7, COND_DIM, generator=torch.Generator().manual_seed(1))
    logits = {
        name: Decoder.from_pretrained(str(release), device="cpu", neg_cond=neg).sample_sparse_structure(cond).logits
        for name, neg in (("default", None), ("zeros", zeros), ("other", other))
    }
    torch.testing.assert_close(logits["zeros"], logits["default"])
    assert not torch.allclose(logits["other"], logits["default"])
