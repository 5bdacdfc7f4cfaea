"""Tiny checkpoints of Table 3's metric extractors, built with the real classes: `tiny://clip` (a random
transformers CLIPModel with its processor and a BPE tokenizer trained here on the world's words) and
`tiny://inception` (gap3d.inception's network, the paper's architecture at full size, with random weights in the
layout of timm/inception_v3.tv_in1k). They exercise the plumbing; their scores mean nothing. DINOv2 features in the
miniature come from tiny://dino.
"""

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from miniature.checkpoints.encoders import _TOKENIZER_CORPUS

CLIP_IMAGE_SIZE = 32


def _clip_tokenizer(vocab_size: int = 400):
    """A CLIPTokenizer over a BPE vocabulary with CLIP's end-of-word suffix and special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<|startoftext|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, end_of_word_suffix="</w>")
    bpe.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer)
    with tempfile.TemporaryDirectory() as directory:
        bpe.model.save(directory)
        return CLIPTokenizer(str(Path(directory) / "vocab.json"), str(Path(directory) / "merges.txt"))


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
