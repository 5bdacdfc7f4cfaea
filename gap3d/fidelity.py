"""Table 3's metrics: FD and KD on Inception-v3 and DINOv2 features of renders, and the CLIP text score.

Definitions (PolyannaG/GAP3D eval/): FD is the Frechet distance between Gaussians fit to the two feature sets
(sample covariances); KD is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 over the
whole sets, times 100; features are Inception-v3's 2048-d pool (gap3d.inception) and DINOv2 ViT-L/14's CLS after its
final norm at 518 px (torch.hub's `x_norm_clstoken`, transformers' `pooler_output`); the CLIP score is 100 x the
mean cosine between each view's image embedding and its caption's text embedding (open_clip ViT-B-32 `openai`, the
weights of transformers' `openai/clip-vit-base-patch32`).

FD and KD are torchmetrics' FrechetInceptionDistance and KernelInceptionDistance fed precomputed features (a
pass-through feature module): KD with one subset of all samples is the paper's unbiased estimate when both sets have
the same size, which the job keeps (an empty generation renders black, and counts). The CLIP score is computed here:
torchmetrics' CLIPScore clips each cosine at 0, the paper does not.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from gap3d.checkpoints import require_files, resolve
from gap3d.inception import InceptionV3Features, inception_inputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KD_SCALE = 100.0  # the paper reports KD x 100
CLIP_SCALE = 100.0  # and the CLIP score x 100


class _Features(nn.Module):
    """torchmetrics' feature-extractor slot, filled with features computed elsewhere: returns its input."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FD between feature sets (n, d) and (m, d), through torchmetrics (float64)."""
    metric = FrechetInceptionDistance(feature=_Features(real.shape[1]))
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, np.float64)), real=False)
    return float(metric.compute())


def kernel_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """KD x 100: unbiased MMD^2, cubic polynomial kernel, over all of two equally sized feature sets (n, d)."""
    if len(real) != len(fake) or len(real) < 2:
        raise ValueError(
            f"KD needs two feature sets of one size >= 2 (the job renders every asset), got {len(real)} and {len(fake)}"
        )
    metric = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=1, subset_size=len(real))
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, np.float64)), real=False)
    return KD_SCALE * float(metric.compute()[0])


def distances(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    return {"fd": frechet_distance(real, fake), "kd": kernel_distance(real, fake)}


def resized_normalised(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, size, size): PIL bicubic resize of the short side, centre crop, ImageNet
    normalisation (the authors' DINOv2 transform)."""
    from PIL import Image

    crops = []
    for image in images:
        picture = Image.fromarray(image)
        scale = size / min(picture.size)
        picture = picture.resize(
            (max(size, int(picture.width * scale)), max(size, int(picture.height * scale))), Image.Resampling.BICUBIC
        )
        left, top = (int(round((side - size) / 2)) for side in picture.size)
        crops.append(np.asarray(picture.crop((left, top, left + size, top + size))))
    pixels = torch.from_numpy(np.stack(crops)).float().div(255).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class InceptionExtractor:
    """Images -> Inception-v3 pool features (B, 2048) float64."""

    def __init__(self, uri: str, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = InceptionV3Features.from_pretrained(uri, self.device)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return self.model(inception_inputs(images).to(self.device)).double().cpu().numpy()


class DinoExtractor:
    """Images -> DINOv2 CLS features after the final norm (B, D) float64, at `image_size` (518 in the paper)."""

    def __init__(self, uri: str, image_size: int = 518, device: str | torch.device = "cpu"):
        from transformers import AutoModel

        directory = resolve(uri)
        require_files(directory, ["config.json"], what="DINOv2 feature checkpoint")
        self.device, self.image_size = torch.device(device), image_size
        self.model = AutoModel.from_pretrained(directory).eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        pixels = resized_normalised(images, self.image_size).to(self.device)
        return self.model(pixel_values=pixels).pooler_output.double().cpu().numpy()


class ClipScorer:
    """CLIP image and text embeddings (transformers CLIPModel and CLIPProcessor, the checkpoint's preprocessing)."""

    def __init__(self, uri: str, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        directory = resolve(uri)
        require_files(directory, ["config.json"], what="CLIP checkpoint")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(directory).eval().requires_grad_(False).to(self.device)
        self.processor = CLIPProcessor.from_pretrained(directory)

    @torch.no_grad()
    def cosines(self, views: list[np.ndarray], caption: str) -> np.ndarray:
        """Cosine of each view's image embedding with the caption's text embedding: (views,)."""
        inputs = self.processor(text=[caption], images=list(views), return_tensors="pt", padding=True, truncation=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        images = F.normalize(_embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
        text = _embedding(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
        return (images @ F.normalize(text, dim=-1).T)[:, 0].double().cpu().numpy()


def _embedding(output) -> torch.Tensor:
    """transformers 5 returns the projected embedding as a tensor or inside an output's pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_score(per_asset_cosines: list[np.ndarray]) -> float:
    """100 x the mean over assets of each asset's mean view cosine (one caption per asset)."""
    return CLIP_SCALE * float(np.mean([np.mean(cosines) for cosines in per_asset_cosines]))
