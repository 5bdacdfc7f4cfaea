"""What the tiny TRELLIS's stage 2 trains on, made from the synthetic world: each object's voxels, their features and
its ground-truth fields.

As TRELLIS encodes an object's active voxels from DINOv2 features of renders around it, each voxel here gets the
tiny DINOv2's patch features at its projection into VIEWS renders (the evaluation camera of gap3d.render: radius 2,
pitch 30 degrees, yaws every 90 degrees), averaged over the views. The voxels are the object's surface shell on the
stage-1 grid, max-pooled to stage 2's, as the Decoder pools a decoded structure; the fields are miniature.fields'.
"""

import numpy as np
import torch
import torch.nn.functional as F

from gap3d.data.occupancy import downsample
from gap3d.dino import DinoTargetEncoder
from gap3d.render import Protocol, camera_frame, render
from miniature.fields import scene_color, scene_sdf
from miniature.world import COLORS, Scene, object_mesh, scene_occupancy

VIEWS = 4


def stage2_voxels(scene: Scene, structure_resolution: int, resolution: int) -> torch.Tensor:
    """(M, 3) int: the scene's surface shell at `structure_resolution`, max-pooled to `resolution`."""
    shell = torch.from_numpy(downsample(scene_occupancy(scene), structure_resolution))
    factor = structure_resolution // resolution
    pooled = F.max_pool3d(shell[None, None].float(), factor)[0, 0] > 0 if factor > 1 else shell
    return torch.argwhere(pooled)


def _project(points: np.ndarray, yaw: float, protocol: Protocol) -> np.ndarray:
    """Points (P, 3) -> grid_sample coordinates (P, 2) in [-1, 1] of the view at `yaw` (x right, y down)."""
    centre, basis = camera_frame(yaw, protocol.pitch_deg, protocol.radius)
    view = (points - centre) @ basis.T
    scale = 1.0 / np.tan(np.deg2rad(protocol.fov_deg) / 2)  # image half-width at depth 1
    return np.stack([scale * view[:, 0] / view[:, 2], -scale * view[:, 1] / view[:, 2]], axis=1)


def voxel_features(scene: Scene, voxels: torch.Tensor, resolution: int, dino: DinoTargetEncoder) -> torch.Tensor:
    """(M, D): the tiny DINOv2's patch features at each voxel centre's projection, averaged over VIEWS renders."""
    protocol = Protocol(resolution=dino.image_size, views=VIEWS, fd_every=1)
    vertices, faces = object_mesh(scene)
    colors = np.broadcast_to(COLORS[scene.color], vertices.shape)
    images = np.stack([render(vertices, faces, colors, yaw, protocol.pitch_deg, protocol) for yaw in protocol.yaws])
    with torch.no_grad():
        tokens = dino.encode(images)  # (V, N, D)
    grid = dino.grid_size
    patches = tokens[:, dino.num_special_tokens :].reshape(VIEWS, grid, grid, -1).permute(0, 3, 1, 2)  # (V, D, g, g)
    centres = (voxels.numpy() + 0.5) / resolution - 0.5
    where = torch.from_numpy(np.stack([_project(centres, yaw, protocol) for yaw in protocol.yaws])).float()
    sampled = F.grid_sample(patches, where[:, :, None], align_corners=False)  # (V, D, M, 1)
    return sampled[..., 0].mean(0).T.contiguous()  # (M, D)


def scene_fields(scene: Scene):
    """The scene's fields for Stage2Trainer: points (P, 3) -> (signed distance (P,), colour (3,))."""
    return lambda points: (scene_sdf(scene, points), scene_color(scene))
