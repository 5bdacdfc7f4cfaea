"""Build the models a config names; the aligner's shapes come from the encoders (torchtitan's update_from_config).

The encoders fix what the aligner reads and writes: DINOv2's hidden size, patch grid and special tokens, the
VLM's hidden size, and the number of soft tokens. `derive_shapes` reads them from the checkpoints' config.json
(no weights loaded) into the aligner's config, which every export then records.
"""

import dataclasses
import logging

import torch

from gap3d.aligner import AlignerDiT
from gap3d.checkpoints import transformers_config
from gap3d.config import DERIVED_SHAPES, Gap3DConfig
from gap3d.dino import DinoTargetEncoder
from gap3d.prompt_encoder import PromptEncoder

logger = logging.getLogger(__name__)


def encoder_shapes(config: Gap3DConfig) -> dict[str, int]:
    """The aligner's token and condition shapes as the configured encoders determine them
    (gap3d.config.DERIVED_SHAPES)."""
    dino = transformers_config(config.dino.path)
    if config.dino.image_size % dino.patch_size:
        raise ValueError(
            f"dino.image_size {config.dino.image_size} is not a multiple of the patch size {dino.patch_size} of "
            f"{config.dino.path}"
        )
    text = transformers_config(config.vlm.path).get_text_config()
    return {
        "token_dim": dino.hidden_size,
        "grid_size": config.dino.image_size // dino.patch_size,
        "num_special_tokens": 1 + dino.num_register_tokens,
        "cond_dim": text.hidden_size,
        "num_cond_tokens": config.vlm.num_soft_tokens,
    }


def derive_shapes(config: Gap3DConfig) -> Gap3DConfig:
    """`config` with the aligner's shapes filled in from the encoders; a value already there must agree (a config
    saved by an earlier run), else ValueError naming the key."""
    shapes = encoder_shapes(config)
    for name in DERIVED_SHAPES:
        given = getattr(config.aligner, name)
        if given is not None and given != shapes[name]:
            raise ValueError(
                f"aligner.{name}={given}, but the encoders ({config.vlm.path}, {config.dino.path} at dino.image_size="
                f"{config.dino.image_size}, vlm.num_soft_tokens={config.vlm.num_soft_tokens}) give {shapes[name]}; "
                "leave it unset: it is derived"
            )
    return dataclasses.replace(config, aligner=dataclasses.replace(config.aligner, **shapes))


def build_encoders(config: Gap3DConfig, device: str | torch.device = "cpu") -> tuple[PromptEncoder, DinoTargetEncoder]:
    """Load the frozen VLM prompt encoder and DINOv2 target encoder named by the config."""
    return PromptEncoder.from_pretrained(config.vlm, device), DinoTargetEncoder.from_pretrained(config.dino, device)


def build_aligner(config: Gap3DConfig, seed: int | None = None) -> AlignerDiT:
    """A freshly initialised AlignerDiT (seeded when `seed` is given) of a config whose shapes are derived."""
    if seed is not None:
        torch.manual_seed(seed)
    aligner = AlignerDiT(config.aligner)
    logger.info("aligner: %.1f M parameters", sum(p.numel() for p in aligner.parameters()) / 1e6)
    return aligner
