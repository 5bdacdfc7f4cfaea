"""PromptEncoder: soft-token latents from a real (tiny) Qwen2.5-VL loaded through from_pretrained."""

import numpy as np
import pytest
import torch
from PIL import Image

from gap3d.config import PromptEncoderConfig
from gap3d.prompt_encoder import PromptEncoder
from gap3d.storage import upload_dir

PROMPTS = ["a red cone", "a much longer prompt about a large blue cube standing in the center of the scene"]


@pytest.fixture(scope="module")
def encoder(tiny_checkpoints):
    return PromptEncoder.from_pretrained(PromptEncoderConfig(path=str(tiny_checkpoints["vlm"]), num_soft_tokens=4))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))


def test_latents_have_shape_batch_by_soft_tokens_by_vlm_hidden(encoder):
    assert encoder(PROMPTS).shape == (2, 4, 64)


def test_batched_prompts_of_different_lengths_match_each_prompt_alone(encoder):
    batched = encoder(PROMPTS)
    alone = torch.cat([encoder([p]) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_cache_based_soft_latents_equal_full_forward(encoder):
    caches = encoder.encode_prompt_cache(PROMPTS)
    torch.testing.assert_close(encoder.soft_latents(caches), encoder(PROMPTS), atol=1e-5, rtol=1e-5)


def test_prompt_cache_is_stored_without_padding(encoder):
    caches = encoder.encode_prompt_cache(PROMPTS)
    lengths = [int(encoder.tokenize([p]).attention_mask.sum()) for p in PROMPTS]
    # (layers, 2, kv_heads, L, head_dim) at each prompt's true length
    assert [tuple(c.key_values.shape) for c in caches] == [(2, 2, 2, n, 16) for n in lengths]
    assert [c.next_position for c in caches] == lengths


def test_image_and_text_prompt_changes_latents_and_matches_alone_in_batch(encoder, image):
    batched = encoder(["a red cone", "other"], images=[image, None])
    alone = encoder(["a red cone"], images=[image])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, encoder(["a red cone"]), atol=1e-3)


def test_cache_based_soft_latents_equal_full_forward_with_an_image(encoder, image):
    caches = encoder.encode_prompt_cache(["a red cone", "other"], images=[image, None])
    # M-RoPE gives an image's tokens fewer positions than tokens, so the soft tokens start earlier.
    assert caches[0].next_position < caches[0].key_values.shape[3]
    full = encoder(["a red cone", "other"], images=[image, None])
    torch.testing.assert_close(encoder.soft_latents(caches), full, atol=1e-5, rtol=1e-5)


def test_gradients_reach_soft_tokens_but_not_vlm_weights(encoder):
    encoder.zero_grad(set_to_none=True)
    encoder.soft_latents(encoder.encode_prompt_cache(PROMPTS)).pow(2).mean().backward()
    assert encoder.soft_tokens.grad is not None and encoder.soft_tokens.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.vlm.parameters())


def test_frozen_soft_tokens_do_not_require_grad(tiny_checkpoints):
    config = PromptEncoderConfig(path=str(tiny_checkpoints["vlm"]), num_soft_tokens=2, trainable=False)
    assert not PromptEncoder.from_pretrained(config).soft_tokens.requires_grad


def test_over_long_prompt_is_rejected_naming_the_limit(tiny_checkpoints):
    config = PromptEncoderConfig(path=str(tiny_checkpoints["vlm"]), num_soft_tokens=2, max_prompt_tokens=16)
    with pytest.raises(ValueError, match="max_prompt_tokens=16"):
        PromptEncoder.from_pretrained(config)(["word " * 40])


def test_loads_from_s3_uri_on_a_local_s3_server(tiny_checkpoints, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))
    upload_dir(tiny_checkpoints["vlm"], f"{s3_bucket}/models/vlm")
    from_s3 = PromptEncoder.from_pretrained(PromptEncoderConfig(path=f"{s3_bucket}/models/vlm", num_soft_tokens=4))
    from_dir = PromptEncoder.from_pretrained(PromptEncoderConfig(path=str(tiny_checkpoints["vlm"]), num_soft_tokens=4))
    torch.testing.assert_close(from_s3(PROMPTS), from_dir(PROMPTS))


def test_missing_checkpoint_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        PromptEncoder.from_pretrained(PromptEncoderConfig(path=str(tmp_path / "nope")))


def test_checkpoint_without_tokenizer_names_the_missing_file(tiny_checkpoints, tmp_path):
    broken = tmp_path / "vlm"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_checkpoints["vlm"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        PromptEncoder.from_pretrained(PromptEncoderConfig(path=str(broken)))


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_soft_tokens_start_at_the_mean_embedding_plus_init_scale_vocabulary_stds(tiny_checkpoints, scale):
    config = PromptEncoderConfig(path=str(tiny_checkpoints["vlm"]), num_soft_tokens=64, init_scale=scale)
    encoder = PromptEncoder.from_pretrained(config)
    table = encoder.embed_tokens.weight.detach()
    offset = encoder.soft_tokens.detach() - table.mean(0)  # (s, d)
    spread = (offset / table.std(0)).std()  # in vocabulary stds, over tokens and dims
    torch.testing.assert_close(spread, torch.tensor(scale), rtol=0.1, atol=1e-6)
