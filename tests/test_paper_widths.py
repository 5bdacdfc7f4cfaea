"""The paper preset's real widths and token counts on CPU, at depth 1 with random weights.

The tiny preset hides every shape bug that depends on the 37x37 grid, the 5 special tokens, the grouped KV heads
of Qwen2.5-VL-3B or its M-RoPE sections. Here the VLM has Qwen2.5-VL-3B-Instruct's text and vision widths (its
public config.json), DINOv2 is ViT-L/14 with 4 registers at 518 px, and the aligner is the 1792-wide paper DiT;
only the depths are cut to one layer (and the vocabulary to the local tokenizer's).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from gap3d.build import build_aligner, build_encoders
from gap3d.config import load_config
from gap3d.data.encode import FeatureEncoder
from gap3d.features.format import batch_from_rows
from gap3d.flow import sample
from gap3d.tiny.encoders import make_tokenizer
from gap3d.training import AlignerTrainModule, batch_condition

CAPTIONS = ["a red cube", "a large blue sphere with a long caption that tokenises to more tokens"]


def write_qwen25_vl_3b_widths(out_dir) -> None:
    """Qwen2.5-VL-3B-Instruct's config.json widths, one text and one vision layer, random weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = make_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=11008, num_hidden_layers=1,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=token_id("<|im_end|>"), pad_token_id=token_id("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, fullatt_block_indexes=[0],
            window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out_dir)


def write_dinov2_vitl14_reg(out_dir) -> None:
    """DINOv2 ViT-L/14 with 4 registers (hidden 1024, 16 heads, 518 px), one layer, random weights."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, mlp_ratio=4, image_size=518, patch_size=14, num_register_tokens=4,
    )
    torch.manual_seed(0)
    Dinov2WithRegistersModel(config).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-widths")
    write_qwen25_vl_3b_widths(root / "vlm")
    write_dinov2_vitl14_reg(root / "dino")
    return load_config("paper", overrides=[
        f"vlm.path={root / 'vlm'}", f"dino.path={root / 'dino'}", "vlm.dtype=float32", "dino.dtype=float32", "aligner.depth=1",
    ])


@pytest.fixture(scope="module")
def feature_rows(config):
    """Two feature rows of 518 px renders through the production encoder (fp16 in the row format)."""
    encoder = FeatureEncoder(config)
    images = np.random.default_rng(0).integers(0, 255, (2, 518, 518, 3), dtype=np.uint8)
    table = encoder.encode(["k0", "k1"], CAPTIONS, images)
    return batch_from_rows(table.to_pydict(), encoder.manifest), encoder


def test_paper_shapes_are_the_trellis_and_qwen_shapes(config, feature_rows):
    batch, encoder = feature_rows
    assert encoder.manifest.dino_shape == [1374, 1024]
    assert encoder.manifest.cache_shape == [1, 2, 2, 128]  # 1 layer, keys+values, 2 KV heads of 128
    assert batch.dino.shape == (2, 1374, 1024)
    assert config.aligner.num_tokens == 1374 and config.vlm.num_soft_tokens == 64


def test_soft_latents_on_stored_caches_equal_the_full_forward(config, feature_rows):
    batch, encoder = feature_rows
    prompt_encoder = encoder.prompt_encoder
    with torch.no_grad():
        full = prompt_encoder(CAPTIONS)  # (2, 64, 2048), left-padded batch
        fresh = prompt_encoder.soft_latents(prompt_encoder.encode_prompt_cache(CAPTIONS))
        stored = batch_condition(batch, prompt_encoder)  # from the fp16 rows
    assert full.shape == (2, 64, 2048)
    torch.testing.assert_close(fresh, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stored, full, atol=5e-2, rtol=5e-2)


def test_image_prompt_cache_follows_the_mrope_positions_of_the_full_forward(config, feature_rows):
    _, encoder = feature_rows
    prompt_encoder = encoder.prompt_encoder
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    with torch.no_grad():
        full = prompt_encoder(["a toy"], [image])
        cache = prompt_encoder.encode_prompt_cache(["a toy"], [image])
        from_cache = prompt_encoder.soft_latents(cache)
    # The image tokens span a 2-D M-RoPE grid, so the soft tokens start after the largest position, not the length.
    assert cache[0].next_position < cache[0].key_values.shape[3]
    torch.testing.assert_close(from_cache, full, atol=1e-4, rtol=1e-4)


def test_one_training_step_reaches_the_aligner_and_the_soft_tokens(config, feature_rows):
    batch, encoder = feature_rows
    aligner = build_aligner(config, seed=0)
    with torch.no_grad():  # leave the zero-init (closed gates, zero output), under which no gradient reaches the condition
        for param in aligner.parameters():
            param.add_(0.02 * torch.randn_like(param))
    module = AlignerTrainModule(aligner, config.flow, encoder.prompt_encoder)
    losses = module(batch, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert module.soft_tokens.grad is not None and module.soft_tokens.grad.abs().sum() > 0
    assert module.aligner.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.prompt_encoder.vlm.parameters())


def test_one_sampling_step_gives_trellis_shaped_tokens(config, feature_rows):
    batch, encoder = feature_rows
    aligner = build_aligner(config, seed=0).eval()
    torch.nn.init.normal_(aligner.final_layer.linear.weight, std=0.02)
    with torch.no_grad():
        cond = batch_condition(batch, encoder.prompt_encoder)
        tokens = sample(aligner, cond, (config.aligner.num_tokens, config.aligner.token_dim), steps=1, cfg_scale=config.flow.cfg_scale,
                        generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 1374, 1024) and torch.isfinite(tokens).all()
    assert not torch.equal(tokens[0], tokens[1])  # the two prompts' conditions reach the output


def test_build_encoders_checks_the_paper_aligner_against_the_loaded_models(config):
    prompt_encoder, dino = build_encoders(config)
    assert (prompt_encoder.hidden_size, dino.dim, dino.grid_size, dino.num_special_tokens) == (2048, 1024, 37, 5)
