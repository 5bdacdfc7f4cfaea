"""Stage-1 occupancy -> the voxel sets stage 2 runs on, bounded in size.

Stage-2 cost grows with the voxel count: the mesh decoder works on 64 cubes per voxel at 4x the
resolution. The release's structures are surface shells of at most a few tens of thousands of voxels,
but a solid or noisy structure can reach 64^3. `max_voxels` bounds one forward pass: samples are
grouped so that each group stays under it (exact, since samples are independent), and a sample over it
on its own keeps only its surface voxels (its interior adds cost but no visible surface), else fails.
"""

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Voxels per stage-2 forward pass (summed over the samples in it). At the release sizes this is
# about 6.4M cubes in the mesh decoder's last layers: fits a 40 GB GPU in fp16.
DEFAULT_MAX_STAGE2_VOXELS = 100_000


class TooManyVoxelsError(ValueError):
    """A sample's structure is too large for one stage-2 pass even after keeping only its surface."""


def surface_mask(occupancy: torch.Tensor) -> torch.Tensor:
    """(R, R, R) bool -> (R, R, R) bool: occupied voxels with an unoccupied face neighbour (or on the border)."""
    padded = F.pad(occupancy[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0]  # outside the grid is empty
    size = occupancy.shape[0]
    enclosed = torch.ones_like(occupancy, dtype=torch.bool)
    for axis in range(3):
        for shift in (0, 2):
            neighbour = padded.narrow(axis, shift, size).narrow((axis + 1) % 3, 1, size).narrow((axis + 2) % 3, 1, size)
            enclosed &= neighbour > 0
    return occupancy & ~enclosed


def stage2_voxels(occupancy: torch.Tensor, max_voxels: int, label: str) -> torch.Tensor:
    """(R, R, R) bool -> (N, 3) int32 [x, y, z] voxels of one sample, N <= max_voxels.

    Over the bound, only the surface voxels are kept (logged); still over it raises TooManyVoxelsError
    naming `label` (e.g. "sample 0 (seed 3)").
    """
    voxels = torch.argwhere(occupancy).int()
    if voxels.shape[0] <= max_voxels:
        return voxels
    surface = torch.argwhere(surface_mask(occupancy)).int()
    if surface.shape[0] > max_voxels:
        raise TooManyVoxelsError(
            f"{label}: its stage-1 structure has {voxels.shape[0]} voxels ({surface.shape[0]} on the surface), more "
            "than "
            f"max_stage2_voxels={max_voxels}; raise Decoder(max_stage2_voxels=...) if memory allows, or use "
            "stage='coarse'"
        )
    logger.warning(
        "%s: %d voxels exceed max_stage2_voxels=%d; decoding its %d surface voxels only",
        label,
        voxels.shape[0],
        max_voxels,
        surface.shape[0],
    )
    return surface


def voxel_budget_groups(counts: dict[int, int], max_voxels: int) -> list[list[int]]:
    """Sample index -> voxel count, grouped in order into runs whose counts sum to <= max_voxels."""
    groups, total = [], 0
    for index, count in counts.items():
        if not groups or total + count > max_voxels:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += count
    return groups
