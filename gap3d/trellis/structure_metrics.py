"""How well decoded stage-1 structures match the 3D ground truth: occupancy IoU, and shape by nearest neighbour.

Both sides are TRELLIS surface shells on the same grid (gap3d.data.occupancy), so IoU is strict: a shell one
voxel off shares little with the truth. `nearest_labels` names a decoded structure by the ground-truth grid
it overlaps most (IoU), which turns "does the decoded object have the prompt's shape" into an accuracy.
"""

from collections.abc import Sequence

import torch

from gap3d.metrics import class_report


def occupancy_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """bool (B, R, R, R) each -> (B,) intersection over union per sample (1 when both are empty)."""
    if predicted.shape != target.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} occupancy must have the same shape"
        )
    predicted, target = predicted.flatten(1).bool(), target.flatten(1).bool()
    union = (predicted | target).sum(1)
    return torch.where(
        union > 0, (predicted & target).sum(1) / union.clamp_min(1), torch.ones_like(union, dtype=torch.float32)
    ).float()


def pairwise_iou(predicted: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """bool (B, R, R, R) and (M, R, R, R) -> (B, M) IoU of every pair."""
    a, b = predicted.flatten(1).float(), references.flatten(1).float()
    intersection = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1)[None] - intersection
    return intersection / union.clamp_min(1)


def nearest_labels(predicted: torch.Tensor, references: torch.Tensor, labels: Sequence[str]) -> list[str]:
    """The label of the reference grid each predicted grid overlaps most (IoU)."""
    if len(labels) != references.shape[0]:
        raise ValueError(f"{len(labels)} labels for {references.shape[0]} reference grids")
    return [labels[i] for i in pairwise_iou(predicted, references).argmax(1).tolist()]


def structure_metrics(
    predicted: torch.Tensor,
    target: torch.Tensor,
    shapes: Sequence[str],
    references: torch.Tensor,
    reference_shapes: Sequence[str],
) -> dict:
    """Decoded structures (B, R, R, R) against the true grids and shape names of the same rows: "iou" (mean and
    "iou_per_shape"), "shape" (class_report of each structure's nearest reference grid's shape) and "voxels"."""
    iou = occupancy_iou(predicted, target)
    by_shape: dict[str, list[float]] = {}
    for name, value in zip(shapes, iou.tolist()):
        by_shape.setdefault(name, []).append(value)
    return {
        "iou": float(iou.mean()),
        "iou_per_shape": {name: sum(values) / len(values) for name, values in sorted(by_shape.items())},
        "shape": class_report(shapes, nearest_labels(predicted, references, reference_shapes)),
        "voxels": float(predicted.flatten(1).sum(1).float().mean()),
    }
