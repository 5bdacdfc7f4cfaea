"""DINOv2 target encoder: images -> the exact token format TRELLIS is conditioned on.

TRELLIS feeds its flow models DINOv2 ViT-L/14-reg features taken from the last block *before* the final
norm, all tokens (CLS, 4 registers, 37x37 patches at 518 px), normalised by a layer norm with no affine
weights. Getting this norm wrong silently breaks TRELLIS, so it lives in exactly one place: here.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gap3d.checkpoints import require_files, resolve
from gap3d.config import DinoConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_targets(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """TRELLIS conditioning from the last block's pre-norm output: non-affine layer norm, all tokens.

    (B, N, D) -> (B, N, D), float32.
    """
    hidden = last_hidden_state.float()
    return F.layer_norm(hidden, hidden.shape[-1:])


def normalize_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB images -> ImageNet-normalised float (B, 3, S, S)."""
    # Converted in numpy: Ray Data hands batches over as read-only arrays, which torch warns of sharing.
    pixels = torch.from_numpy(np.asarray(images, dtype=np.float32)).div(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a name gives: "auto" -> bf16 on CUDA, fp32 elsewhere; otherwise the named torch dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtype


class DinoTargetEncoder(nn.Module):
    """Frozen DINOv2-with-registers producing (B, 1374, 1024) targets at the paper preset."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        patch = model.config.patch_size
        if image_size % patch:
            raise ValueError(f"dino.image_size {image_size} is not a multiple of the patch size {patch}")
        self.grid_size = image_size // patch
        self.num_special_tokens = 1 + model.config.num_register_tokens
        self.num_tokens = self.grid_size**2 + self.num_special_tokens
        self.dim = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, config: DinoConfig, device: str | torch.device = "cpu") -> "DinoTargetEncoder":
        """Load a Dinov2WithRegistersModel from config.path (local dir or s3:// URI)."""
        from transformers import Dinov2WithRegistersModel

        path = resolve(config.path)
        require_files(path, ["config.json"], what="DINOv2 checkpoint")
        device = torch.device(device)
        model = Dinov2WithRegistersModel.from_pretrained(path, dtype=resolve_dtype(config.dtype, device))
        return cls(model, config.image_size).to(device)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) -> DINOv2 targets (B, N, D) float32, N = grid^2 + 5."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.image_size}x{self.image_size}, got {tuple(pixel_values.shape[-2:])}"
            )
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        return dino_targets(out.hidden_states[-1])  # (B, 1374, 1024)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, S, S, 3) square RGB images -> DINOv2 targets (B, N, D) float32."""
        return self(normalize_images(images))
