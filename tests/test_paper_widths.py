"""The paper preset's real widths and token counts on CPU, at depth 1 with random weights.

The tiny preset hides every shape bug that depends on the 37x37 grid, the 5 special tokens, the grouped KV heads
of Qwen2.5-VL-3B or its M-RoPE sections. Here the encoders have the paper checkpoints' widths
(miniature.checkpoints.paper_widths) and the aligner is the 1792-wide paper DiT with its shapes derived from them;
only the depths are cut to one layer (and the vocabulary to the local tokenizer's).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from gap3d.build import build_aligner, build_encoders, derive_shapes
from gap3d.config import load_config
from gap3d.data.encode import FeatureEncoder
from gap3d.features.format import batch_from_rows
from gap3d.flow import sample
from gap3d.training import AlignerTrainModule, batch_condition
from miniature.checkpoints.paper_widths import write_paper_width_dino, write_paper_width_vlm

CAPTIONS = ["a red cube", "a large blue sphere with a long caption that tokenises to more tokens"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-widths")
    write_paper_width_vlm(root / "vlm", text_layers=1, vision_layers=1)
    write_paper_width_dino(root / "dino", layers=1)
    return derive_shapes(
        load_config(
            "paper",
            overrides=[
                f"vlm.path={root / 'vlm'}",
                f"dino.path={root / 'dino'}",
                "vlm.dtype=float32",
                "dino.dtype=float32",
                "aligner.depth=1",
            ],
        )
    )


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
    assert (
        config.aligner.num_tokens,
        config.aligner.token_dim,
        config.aligner.cond_dim,
        config.aligner.num_cond_tokens,
    ) == (1374, 1024, 2048, 64)


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
    with (
        torch.no_grad()
    ):  # leave the zero-init (closed gates, zero output), under which no gradient reaches the condition
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
        tokens = sample(
            aligner,
            cond,
            (config.aligner.num_tokens, config.aligner.token_dim),
            steps=1,
            cfg_scale=config.flow.cfg_scale,
            generator=torch.Generator().manual_seed(0),
        )
    assert tokens.shape == (2, 1374, 1024) and torch.isfinite(tokens).all()
    assert not torch.equal(tokens[0], tokens[1])  # the two prompts' conditions reach the output


def test_the_derived_shapes_are_those_of_the_loaded_models(config):
    prompt_encoder, dino = build_encoders(config)
    assert (prompt_encoder.hidden_size, dino.dim, dino.grid_size, dino.num_special_tokens) == (2048, 1024, 37, 5)
    aligner = config.aligner
    assert (aligner.cond_dim, aligner.token_dim, aligner.grid_size, aligner.num_special_tokens) == (2048, 1024, 37, 5)
