"""Build the models named by a config, checking that their dimensions agree with each other."""

import logging

import torch

from gap3d.aligner import AlignerDiT
from gap3d.config import Gap3DConfig
from gap3d.dino import DinoTargetEncoder
from gap3d.prompt_encoder import PromptEncoder

logger = logging.getLogger(__name__)


def check_aligner_matches(config: Gap3DConfig, prompt_encoder: PromptEncoder | None, dino: DinoTargetEncoder | None) -> None:
    """Raise ValueError naming the config key whose value disagrees with a loaded model."""
    aligner = config.aligner
    if prompt_encoder is not None and prompt_encoder.hidden_size != aligner.cond_dim:
        raise ValueError(f"aligner.cond_dim={aligner.cond_dim} but the VLM at {config.vlm.path} has hidden size {prompt_encoder.hidden_size}")
    if dino is not None:
        if dino.dim != aligner.token_dim:
            raise ValueError(f"aligner.token_dim={aligner.token_dim} but the DINOv2 at {config.dino.path} has hidden size {dino.dim}")
        if dino.grid_size != aligner.grid_size or dino.num_special_tokens != aligner.num_special_tokens:
            raise ValueError(
                f"aligner.grid_size={aligner.grid_size}, aligner.num_special_tokens={aligner.num_special_tokens} but DINOv2 at "
                f"dino.image_size={config.dino.image_size} gives a {dino.grid_size}x{dino.grid_size} grid and {dino.num_special_tokens} special tokens"
            )


def build_encoders(config: Gap3DConfig, device: str | torch.device = "cpu") -> tuple[PromptEncoder, DinoTargetEncoder]:
    """Load the frozen VLM prompt encoder and DINOv2 target encoder named by the config."""
    prompt_encoder = PromptEncoder.from_pretrained(config.vlm, device)
    dino = DinoTargetEncoder.from_pretrained(config.dino, device)
    check_aligner_matches(config, prompt_encoder, dino)
    return prompt_encoder, dino


def build_aligner(config: Gap3DConfig, seed: int | None = None) -> AlignerDiT:
    """A freshly initialised AlignerDiT (seeded when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    aligner = AlignerDiT(config.aligner)
    logger.info("aligner: %.1f M parameters", sum(p.numel() for p in aligner.parameters()) / 1e6)
    return aligner
