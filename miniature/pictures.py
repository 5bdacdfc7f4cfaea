"""Pictures of what the aligner learned: PCA-RGB maps of DINOv2 patch tokens, learning curves, asset renders.

PCA-RGB is the standard way DINOv2 features are drawn: the top three principal components of patch tokens
(fit once, here on training targets) become red, green and blue, so equal colours mean similar features.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class PcaBasis:
    """Three principal directions of patch tokens and the range that maps them to [0, 1]."""

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (3, D)
    low: torch.Tensor  # (3,) 1st percentile of the projections
    high: torch.Tensor  # (3,) 99th percentile


def fit_pca(patch_tokens: torch.Tensor) -> PcaBasis:
    """PCA of patch tokens (M, D) -> the basis that draws them."""
    tokens = patch_tokens.float()
    mean = tokens.mean(0)
    _, _, v = torch.pca_lowrank(tokens - mean, q=3, center=False)
    components = v.T[:3]  # (3, D)
    projected = (tokens - mean) @ components.T
    return PcaBasis(mean, components, torch.quantile(projected, 0.01, dim=0), torch.quantile(projected, 0.99, dim=0))


def pca_rgb(patch_tokens: torch.Tensor, basis: PcaBasis, grid: int) -> np.ndarray:
    """Patch tokens (grid^2, D) -> an RGB image (grid, grid, 3) in [0, 1]."""
    projected = (patch_tokens.float() - basis.mean) @ basis.components.T  # (grid^2, 3)
    scaled = ((projected - basis.low) / (basis.high - basis.low).clamp_min(1e-6)).clamp(0, 1)
    return scaled.reshape(grid, grid, 3).numpy()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def alignment_figure(rows: list[dict], basis: PcaBasis, grid: int, num_special: int, path: str | Path) -> Path:
    """One row per prompt: the rendered image, PCA-RGB of its true and of its generated patch tokens, captions.

    rows: {"caption", "retrieved" (top-1 retrieved caption), "image" (H, W, 3) uint8, "target" and "generated"
    (N, D) tokens, special tokens first}.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for row, axis in zip(rows, axes):
        panels = (
            row["image"],
            pca_rgb(row["target"][num_special:], basis, grid),
            pca_rgb(row["generated"][num_special:], basis, grid),
        )
        for ax, panel, title in zip(axis, panels, ("render", "true tokens", "from the caption")):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        mark = "" if row["retrieved"] == row["caption"] else "  (retrieved: " + row["retrieved"] + ")"
        axis[0].set_ylabel(row["caption"] + mark, fontsize=7, rotation=0, ha="right", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def assets_figure(rows: list[dict], path: str | Path) -> Path:
    """One row per prompt: the ground-truth render of an unseen object it describes, and a render of the GLB
    the service returned for it. rows: {"prompt", "truth" and "asset" (H, W, 3) uint8}."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 2, figsize=(5, 2.5 * len(rows)), squeeze=False)
    for row, axis in zip(rows, axes):
        for ax, panel, title in zip(
            axis, (row["truth"], row["asset"]), ("ground truth (unseen object)", "GLB over HTTP")
        ):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        axis[0].set_ylabel(row["prompt"], fontsize=8, rotation=0, ha="right", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def learning_curve_figure(history: list[dict], chance: dict[str, float], path: str | Path) -> Path:
    """Held-out metrics against step from the periodic evaluations: history [{"step", metric: value, ...}]."""
    plt = _pyplot()
    metrics = [
        m
        for m in ("eval_centred_recall@5", "eval_prompt_cosine_mean", "eval_shape_accuracy", "eval_color_accuracy")
        if all(m in h for h in history)
    ]
    figure, axis = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for metric in metrics:
        line = axis.plot(steps, [h[metric] for h in history], marker="o", label=metric.removeprefix("eval_"))[0]
        if metric in chance:
            axis.axhline(chance[metric], color=line.get_color(), linestyle=":", linewidth=1)
    axis.set_xlabel("optimiser step")
    axis.set_ylim(-0.05, 1.05)
    axis.set_title("held-out attribute pairs (dotted: chance)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
