"""Tiny random VLM and DINOv2 checkpoints, built with the real transformers classes and `save_pretrained`.

The tokenizer is a byte-level BPE trained here on a few sentences, with the Qwen chat special tokens.
"""

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Chat template in the Qwen-VL style: one <|image_pad|> per image, which the prompt encoder expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Every word of the synthetic world's captions, so each comes out as one or two tokens.
_TOKENIZER_CORPUS = (
    "Please generate image based on the following caption:",
    "a red cube, one orange sphere, the yellow pillar, a green cone, a blue torus, a purple slab, a white cube",
    "a cube in red, a sphere in orange, a pillar in yellow, a cone in green, a torus in blue, a slab in purple",
    "the cube is white on black, the sphere is blue, the torus is red, the slab is green, the cone is yellow",
    "user assistant system You are a helpful assistant.",
)


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with the Qwen chat special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bars go to stdout, which carries the JSON lines of the jobs and benchmarks
    )
    bpe.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_vlm(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a random Qwen2.5-VL (tiny text and vision towers) + tokenizer + image processor to out_dir."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    out_dir = Path(out_dir)
    tokenizer = make_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=None,
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[1],
            window_size=56,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Small pixel budget: a 224 px image becomes 8x8 merged tokens.
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224).save_pretrained(out_dir)
    return out_dir


def write_tiny_dino(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a random Dinov2WithRegistersModel (patch 14, 4 registers, like ViT-L/14-reg) to out_dir."""
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=518,
        patch_size=14,
        num_register_tokens=4,
    )
    torch.manual_seed(seed)
    model = Dinov2WithRegistersModel(config)
    # Real DINOv2's final norm has learned affine weights; random ones keep pre- vs post-norm distinguishable.
    torch.nn.init.normal_(model.layernorm.weight, mean=1.0, std=0.5)
    torch.nn.init.normal_(model.layernorm.bias, std=0.5)
    model.save_pretrained(out_dir)
    return Path(out_dir)
