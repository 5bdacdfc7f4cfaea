"""Random checkpoints at the widths of the paper's encoders, for tests and benchmarks that have no hub to reach.

The VLM is Qwen2.5-VL-3B-Instruct's architecture (its public config.json: text and vision widths, grouped KV heads,
M-RoPE sections) with the local tokenizer's vocabulary; DINOv2 is ViT-L/14 with 4 registers at 518 px. Depths are
parameters: tests cut them to one layer, the GPU check keeps the true ones. `weights=False` writes config.json
alone, which is all gap3d.build.derive_shapes reads.
"""

from pathlib import Path

import torch

from miniature.checkpoints.encoders import make_tokenizer

QWEN25_VL_3B_TEXT_LAYERS = 36
QWEN25_VL_3B_VISION_LAYERS = 32
DINOV2_LARGE_LAYERS = 24


def qwen25_vl_3b_config(
    tokenizer, text_layers: int = QWEN25_VL_3B_TEXT_LAYERS, vision_layers: int = QWEN25_VL_3B_VISION_LAYERS
):
    """Qwen2.5-VL-3B-Instruct's Qwen2_5_VLConfig at the given depths, for `tokenizer`'s vocabulary and special
    tokens."""
    from transformers import Qwen2_5_VLConfig

    token_id = tokenizer.convert_tokens_to_ids
    # The release's full-attention vision blocks are every 8th; keep the last block full at any depth.
    full_attention = [index for index in range(7, vision_layers, 8)] or [vision_layers - 1]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=text_layers,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=vision_layers,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            fullatt_block_indexes=full_attention,
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )


def dinov2_large_config(layers: int = DINOV2_LARGE_LAYERS):
    """DINOv2 ViT-L/14 with 4 registers (hidden 1024, 16 heads, 518 px) at the given depth."""
    from transformers import Dinov2WithRegistersConfig

    return Dinov2WithRegistersConfig(
        hidden_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        num_register_tokens=4,
    )


def write_paper_width_vlm(
    out_dir: str | Path,
    text_layers: int = QWEN25_VL_3B_TEXT_LAYERS,
    vision_layers: int = QWEN25_VL_3B_VISION_LAYERS,
    weights: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A Qwen2.5-VL-3B-width VLM (random weights in `dtype`, or config.json alone) + tokenizer + image processor at
    `out_dir`."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    out_dir = Path(out_dir)
    tokenizer = make_tokenizer()
    config = qwen25_vl_3b_config(tokenizer, text_layers, vision_layers)
    if weights:
        torch.manual_seed(seed)
        with torch.device(device):
            Qwen2_5_VLForConditionalGeneration(config).to(dtype).save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out_dir)
    return out_dir


def write_paper_width_dino(
    out_dir: str | Path,
    layers: int = DINOV2_LARGE_LAYERS,
    weights: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A DINOv2 ViT-L/14-reg (random weights in `dtype`, or config.json alone) at `out_dir`."""
    from transformers import Dinov2WithRegistersModel

    config = dinov2_large_config(layers)
    if weights:
        torch.manual_seed(seed)
        with torch.device(device):
            Dinov2WithRegistersModel(config).to(dtype).save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
    return Path(out_dir)


def paper_config_without_weights(root: str | Path, overrides: tuple[str, ...] = ()):
    """The `paper` preset (plus `overrides`) on config.json-only encoders of the paper's widths under `root`, its
    shapes derived: for building the paper-size aligner where the real checkpoints are not at hand."""
    from gap3d.build import derive_shapes
    from gap3d.config import load_config

    root = Path(root)
    write_paper_width_vlm(root / "vlm", weights=False)
    write_paper_width_dino(root / "dino", weights=False)
    return derive_shapes(
        load_config("paper", overrides=[f"vlm.path={root / 'vlm'}", f"dino.path={root / 'dino'}", *overrides])
    )
