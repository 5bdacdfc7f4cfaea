"""DinoTargetEncoder: the exact TRELLIS conditioning format from a real (tiny) Dinov2WithRegistersModel."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gap3d.config import DinoConfig
from gap3d.dino import DinoTargetEncoder, normalize_images


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 255, (2, 518, 518, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def encoder(tiny_checkpoints):
    return DinoTargetEncoder.from_pretrained(DinoConfig(path=str(tiny_checkpoints["dino"]), image_size=518))


def test_518px_images_give_1374_tokens_cls_4_registers_37x37_patches(encoder, images):
    assert encoder.encode(images).shape == (2, 1 + 4 + 37 * 37, 64)


def test_targets_are_the_pre_norm_last_block_output_with_non_affine_layer_norm(encoder, images):
    pixels = normalize_images(images)
    hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    mean, var = hidden.mean(-1, keepdim=True), hidden.var(-1, unbiased=False, keepdim=True)
    reference = (hidden - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(encoder(pixels), reference, atol=1e-4, rtol=1e-4)


def test_targets_differ_from_the_models_final_affine_norm_output(encoder, images):
    # The tiny factory gives the final norm non-trivial affine weights, as the real DINOv2 has.
    with torch.no_grad():
        last = encoder.model(pixel_values=normalize_images(images)).last_hidden_state
    assert not torch.allclose(encoder.encode(images), F.layer_norm(last, last.shape[-1:]), atol=1e-2)


def test_each_token_is_normalised_to_zero_mean_unit_std(encoder, images):
    targets = encoder.encode(images)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(targets.shape[:2]), atol=1e-5, rtol=0)
    # std = sqrt(var / (var + eps)): low-variance tokens of a random model sit a little under 1.
    torch.testing.assert_close(targets.std(-1, unbiased=False), torch.ones(targets.shape[:2]), atol=2e-2, rtol=0)


def test_imagenet_normalisation_of_uint8_images():
    white = np.full((1, 14, 14, 3), 255, dtype=np.uint8)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(normalize_images(white)[0, :, 0, 0], expected)


def test_dino_weights_are_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())


def test_wrong_image_size_is_rejected_with_expected_size(encoder):
    with pytest.raises(ValueError, match="518x518"):
        encoder(torch.zeros(1, 3, 224, 224))


def test_loads_from_s3_uri_on_a_local_s3_server(tiny_checkpoints, s3_bucket, tmp_path, monkeypatch, images):
    from gap3d.storage import upload_dir

    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))
    upload_dir(tiny_checkpoints["dino"], f"{s3_bucket}/models/dino")
    from_s3 = DinoTargetEncoder.from_pretrained(DinoConfig(path=f"{s3_bucket}/models/dino", image_size=518))
    from_dir = DinoTargetEncoder.from_pretrained(DinoConfig(path=str(tiny_checkpoints["dino"]), image_size=518))
    torch.testing.assert_close(from_s3.encode(images[:1]), from_dir.encode(images[:1]))


def test_missing_checkpoint_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        DinoTargetEncoder.from_pretrained(DinoConfig(path=str(tmp_path / "none")))


def test_read_only_images_as_ray_data_hands_them_over_normalise_alike_without_a_warning(images):
    read_only = images.copy()
    read_only.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = normalize_images(read_only)
    reference = (torch.from_numpy(images.copy()).float() / 255).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels, (reference - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
