"""Pictures: PCA-RGB maps of patch tokens, and the demo's figure files."""

import numpy as np
import torch
from PIL import Image

from miniature.pictures import alignment_figure, fit_pca, learning_curve_figure, pca_rgb


def tokens_along(direction: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens spread along one direction plus a little noise: (steps, D)."""
    g = torch.Generator().manual_seed(0)
    return torch.linspace(-1, 1, steps)[:, None] * direction + 0.01 * torch.randn(
        steps, direction.shape[0], generator=g
    )


def test_the_first_component_follows_the_direction_of_largest_spread():
    direction = torch.zeros(16)
    direction[3] = 1.0
    basis = fit_pca(tokens_along(direction, 256))
    assert abs(basis.components[0] @ direction) > 0.99


def test_pca_rgb_maps_tokens_to_a_grid_image_in_the_unit_range():
    direction = torch.ones(16) / 4
    tokens = tokens_along(direction, 64)
    image = pca_rgb(tokens, fit_pca(tokens), grid=8)
    assert image.shape == (8, 8, 3) and image.min() >= 0 and image.max() <= 1
    red = image[..., 0].reshape(-1)
    assert abs(np.corrcoef(red, np.arange(64))[0, 1]) > 0.95  # the ramp along the direction shows as a ramp of red


def test_alignment_figure_draws_one_row_per_prompt(tmp_path):
    tokens = tokens_along(torch.ones(16) / 4, 5 + 16)
    row = {
        "caption": "a red cube",
        "retrieved": "a red torus",
        "image": np.zeros((32, 32, 3), np.uint8),
        "target": tokens,
        "generated": tokens.flip(0),
    }
    heights = []
    for count in (1, 3):
        path = alignment_figure(
            [row] * count, fit_pca(tokens[5:]), grid=4, num_special=5, path=tmp_path / f"{count}.png"
        )
        heights.append(Image.open(path).size[1])
    assert heights[1] == 3 * heights[0]


def test_learning_curve_draws_the_periodic_evals(tmp_path):
    history = [
        {"step": s, "eval_centred_recall@5": s / 1000, "eval_prompt_cosine_mean": s / 500} for s in (100, 200, 300)
    ]
    path = learning_curve_figure(history, {"eval_centred_recall@5": 0.05}, tmp_path / "curve.png")
    assert Image.open(path).size == (600, 400)
