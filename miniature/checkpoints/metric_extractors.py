"""Tiny checkpoints of Table 3's metric extractors, built with the real classes: `tiny://clip` (a random
transformers CLIPModel with its processor and a character-level tokenizer of a fixed vocabulary) and
`tiny://inception` (gap3d.inception's network, the paper's architecture at full size, with random weights in the
layout of timm/inception_v3.tv_in1k). They exercise the plumbing; their scores mean nothing. DINOv2 features in the
miniature come from tiny://dino.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

CLIP_IMAGE_SIZE = 32


def _clip_tokenizer():
    """A CLIPTokenizer over a fixed vocabulary, CLIP's special tokens and every byte symbol of its byte-level BPE alone
    and as a word's end, with no merges (one token a character): the same ids on every build, which a BPE trained here
    did not give (the trainer breaks ties between equally frequent pairs differently from run to run)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(symbol + "</w>" for symbol in symbols)]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[])


def write_tiny_clip(out_dir: str | Path, width: int = 32, seed: int = 0) -> Path:
    """A random CLIPModel (2-layer towers of `width`, 32 px images) + CLIPProcessor at `out_dir`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"))
    }
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["eos"],
        ),
        vision_config=dict(**tower, image_size=CLIP_IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    size = {"shortest_edge": CLIP_IMAGE_SIZE}
    crop = {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    CLIPProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer).save_pretrained(
        out_dir
    )
    return Path(out_dir)


def write_random_inception(out_dir: str | Path, seed: int = 0) -> Path:
    """gap3d.inception's Inception-v3 with random weights, as model.safetensors in fp16 (half the bytes)."""
    from gap3d.inception import WEIGHTS_NAME, InceptionV3Features

    torch.manual_seed(seed)
    state = {
        key: value.half() if value.is_floating_point() else value
        for key, value in InceptionV3Features().state_dict().items()
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out_dir) / WEIGHTS_NAME))
    return Path(out_dir)
