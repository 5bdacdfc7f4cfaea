"""Structure metrics: occupancy IoU and shape by nearest ground-truth grid, against hand-computed cases."""

import pytest
import torch

from gap3d.trellis.structure_metrics import nearest_labels, occupancy_iou, pairwise_iou, structure_metrics


def grid(*cells: tuple[int, int, int], side: int = 4) -> torch.Tensor:
    occupancy = torch.zeros(side, side, side, dtype=torch.bool)
    for cell in cells:
        occupancy[cell] = True
    return occupancy


def test_iou_counts_shared_voxels_over_all_occupied_ones():
    a = grid((0, 0, 0), (1, 1, 1), (2, 2, 2))
    b = grid((1, 1, 1), (2, 2, 2), (3, 3, 3), (0, 1, 2))
    torch.testing.assert_close(occupancy_iou(a[None], b[None]), torch.tensor([2 / 5]))


def test_two_empty_grids_agree_and_an_empty_guess_scores_zero():
    empty, full = grid(), grid((1, 2, 3))
    torch.testing.assert_close(
        occupancy_iou(torch.stack([empty, empty]), torch.stack([empty, full])), torch.tensor([1.0, 0.0])
    )


def test_pairwise_iou_matches_the_per_pair_computation():
    grids = torch.rand(5, 4, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.3
    table = pairwise_iou(grids[:2], grids)
    for i in range(2):
        for j in range(5):
            torch.testing.assert_close(table[i, j], occupancy_iou(grids[i : i + 1], grids[j : j + 1])[0])


def test_nearest_label_is_the_label_of_the_most_overlapping_reference():
    cube, ring = grid((0, 0, 0), (0, 0, 1), (0, 1, 0)), grid((3, 3, 3), (3, 3, 2))
    guess = grid((0, 0, 0), (0, 0, 1))
    assert nearest_labels(torch.stack([guess]), torch.stack([ring, cube]), ["torus", "cube"]) == ["cube"]
    with pytest.raises(ValueError, match="2 labels for 1 reference"):
        nearest_labels(guess[None], cube[None], ["a", "b"])


def test_structure_metrics_report_iou_and_shape_per_class_with_confusions_and_size():
    cube, ring = grid((0, 0, 0), (0, 0, 1)), grid((3, 3, 3), (3, 3, 2))
    metrics = structure_metrics(
        torch.stack([cube, cube]),
        torch.stack([cube, ring]),
        ["cube", "torus"],
        torch.stack([cube, ring]),
        ["cube", "torus"],
    )
    assert (
        metrics["iou"] == 0.5 and metrics["iou_per_shape"] == {"cube": 1.0, "torus": 0.0} and metrics["voxels"] == 2.0
    )
    assert metrics["shape"]["accuracy"] == 0.5
    assert metrics["shape"]["per_class"] == {"cube": 1.0, "torus": 0.0}
    assert metrics["shape"]["confusion"] == {"cube": {"cube": 1}, "torus": {"cube": 1}}
