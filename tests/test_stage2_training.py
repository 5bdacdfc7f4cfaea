"""Stage-2 training at toy size: a VAE step over a batch of objects supervises each object's cubes with that
object's own fields."""

import math

import numpy as np
import pytest
import torch

from gap3d.trellis.stage2_training import Stage2Config, Stage2Trainer

RESOLUTION = 16
BLOCK = 3  # each toy object is a solid block of BLOCK^3 voxels
TOY = {
    "resolution": RESOLUTION,
    "vae_blocks": 1,
    "crop": 4,
    "flow_width": 32,
    "flow_blocks": 1,
    "flow_heads": 2,
    "vae_steps": 2,
    "flow_steps": 1,
    "vae_batch_size": 3,
}


def block_at(offset: int) -> torch.Tensor:
    """(BLOCK^3, 3) voxels of a block whose low corner is (offset, offset, offset)."""
    axis = torch.arange(BLOCK) + offset
    return torch.cartesian_prod(axis, axis, axis)


def test_a_batched_vae_step_asks_each_object_for_the_corners_of_its_own_cubes_only():
    offsets = [0, 5, 10]  # disjoint blocks, so a corner tells which object it belongs to
    voxels = [block_at(offset) for offset in offsets]
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(len(v), 16, generator=generator) for v in voxels]
    asked: list[tuple[int, np.ndarray]] = []

    def fields(index: int, points: np.ndarray):
        asked.append((index, points))
        return np.zeros(len(points)), np.asarray([0.2 * index, 0.5, 0.5])

    trainer = Stage2Trainer(Stage2Config(**TOY), voxels, features, torch.randn(3, 5, 16, generator=generator), fields)
    values = trainer.train_step()
    assert len(asked) == TOY["vae_batch_size"]
    for index, points in asked:
        low = offsets[index] / RESOLUTION - 0.5  # the block's extent in TRELLIS's frame
        high = (offsets[index] + BLOCK) / RESOLUTION - 0.5
        assert len(points) > 0 and len(points) % 8 == 0
        assert points.min() >= low - 1e-6 and points.max() <= high + 1e-6, (index, points.min(), points.max())
    assert all(math.isfinite(value) for value in values.values()), values


def test_vae_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="vae_batch_size"):
        Stage2Config(vae_batch_size=0)
