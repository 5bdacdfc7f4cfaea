"""Triangle mesh from the mesh decoder's per-cube predictions, in plain PyTorch.

Each active cube of the (4 x 64)^3 = 256^3 grid predicts, in TRELLIS's channel layout: an SDF value
and a 3-D deformation per corner (8 + 24 channels), 21 FlexiCubes weights (12 edge weights beta,
8 corner weights alpha, 1 split weight gamma) and, with colour, 6 attributes per corner (RGB +
normal, 48 channels). As in TRELLIS, corner values shared by neighbouring cubes are averaged into
one value per grid vertex; grid vertices no active cube touches count as outside (SDF 1, no
deformation), and SDF < 0 is inside. Vertex v sits at v / res - 0.5 + tanh(deform) / (2 res), so
the mesh lies in TRELLIS's [-0.5, 0.5]^3 box.

The release extracts with FlexiCubes. This is its dual construction with one vertex per cube
(surface nets): every grid edge whose ends differ in sign gets a crossing point, the linear zero of
the alpha-weighted SDF along the edge; each cube touching such an edge gets one vertex, the
beta-weighted mean of its crossings; each sign-changing edge becomes a quad over the four cubes
around it, split into two triangles along the diagonal gamma favours (as FlexiCubes does at
inference). It differs from FlexiCubes only in cubes whose sign pattern is ambiguous, where
FlexiCubes places two or more vertices and this places one. Colours are interpolated the same way.
"""

import logging

import numpy as np
import torch
import trimesh

from gap3d.trellis.sparse.conv import lookup_voxels

logger = logging.getLogger(__name__)

# Corner order of TRELLIS's cube features (x fastest) and FlexiCubes' 12 edges as corner pairs.
CUBE_CORNERS = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
CUBE_EDGES = [[0, 1], [1, 5], [4, 5], [0, 4], [2, 3], [3, 7], [6, 7], [2, 6], [2, 0], [3, 1], [7, 5], [6, 4]]
# FlexiCubes squashes its raw weights into 1 +- WEIGHT_SCALE (alpha, beta) and (0, 1) (gamma).
WEIGHT_SCALE = 0.99
NUM_WEIGHTS = 21
COLOR_CHANNELS = 6


def cube_feature_channels(use_color: bool) -> int:
    """Channels per cube: sdf 8 + deform 24 + weights 21 (+ colour 48)."""
    return 8 + 24 + NUM_WEIGHTS + (8 * COLOR_CHANNELS if use_color else 0)


def _with_batch_zero(coords: torch.Tensor) -> torch.Tensor:
    """(N, 3) -> (N, 4) with a leading batch column of zeros."""
    return torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1)


def _lookup(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Row in `table` (N, 3) of each query (Q, 3), -1 where absent."""
    return lookup_voxels(_with_batch_zero(table), _with_batch_zero(queries))


def _gather_or(values: torch.Tensor, index: torch.Tensor, default: float) -> torch.Tensor:
    """values[index] with rows where index == -1 set to `default`."""
    out = values[index.clamp(min=0)]
    missing = (index < 0).reshape(*index.shape, *([1] * (values.dim() - 1)))
    return torch.where(missing, torch.full_like(out, default), out)


def _unique_points(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique non-negative integer points (N, 3) -> (U, 3) sorted, and (N,) index into them."""
    extent = int(points.max()) + 1 if points.numel() else 1
    keys = (points[:, 0] * extent + points[:, 1]) * extent + points[:, 2]  # 1-D unique is much faster than dim=0
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    return torch.stack([unique_keys // extent**2, unique_keys // extent % extent, unique_keys % extent], dim=1), inverse


def _vertex_attributes(coords: torch.Tensor, corner_attrs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average per-corner attributes (N, 8, A) over shared grid vertices -> vertices (V, 3), attrs (V, A)."""
    corners = torch.tensor(CUBE_CORNERS, device=coords.device)
    vertices, inverse = _unique_points((coords[:, None, :] + corners[None]).reshape(-1, 3))
    flat = corner_attrs.reshape(-1, corner_attrs.shape[-1])
    sums = flat.new_zeros(vertices.shape[0], flat.shape[1]).index_add_(0, inverse, flat)
    counts = torch.bincount(inverse, minlength=vertices.shape[0]).to(flat.dtype)
    return vertices, sums / counts[:, None]


def _sign_change_edges(
    vertices: torch.Tensor, sdf: torch.Tensor, resolution: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid edges (vertices 0..resolution) from an inside to an outside end: (E, 3) lower end, (E,) axis,
    (E,) whether the inside end is the lower one. Each such edge is found once, from its inside end."""
    inside = torch.nonzero(sdf < 0).squeeze(1)
    steps = torch.cat([torch.eye(3, dtype=torch.long), -torch.eye(3, dtype=torch.long)]).to(vertices.device)
    start = vertices[inside][:, None, :].expand(-1, 6, -1).reshape(-1, 3)
    step = steps[None].expand(inside.shape[0], -1, -1).reshape(-1, 3)
    end = start + step
    in_grid = ((end >= 0) & (end <= resolution)).all(dim=1)
    start, step, end = start[in_grid], step[in_grid], end[in_grid]
    end_sdf = _gather_or(sdf, _lookup(vertices, end), 1.0)
    crossing = end_sdf >= 0
    start, step, end = start[crossing], step[crossing], end[crossing]
    axis = step.abs().argmax(dim=1)
    return torch.minimum(start, end), axis, step.sum(dim=1) > 0


def _edge_quads(lower: torch.Tensor, axis: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 cubes around each edge, in cyclic order: (E, 4, 3) cube coords and (E,) all-inside-grid mask."""
    ring = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]], device=lower.device)
    cubes = lower[:, None, :].repeat(1, 4, 1)
    rows = torch.arange(lower.shape[0], device=lower.device)
    for k in range(2):
        other = (axis + 1 + k) % 3  # the two axes across the edge, in cyclic order
        cubes[rows[:, None], torch.arange(4, device=lower.device)[None], other[:, None]] -= ring[None, :, k]
    valid = ((cubes >= 0) & (cubes < resolution)).all(dim=2).all(dim=1)
    return cubes, valid


def _dual_vertices(
    cubes: torch.Tensor,
    vertices: torch.Tensor,
    vertex_attrs: torch.Tensor,
    active: torch.Tensor,
    weights: torch.Tensor,
    resolution: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vertex per cube (C, 3): beta-weighted mean of its edge crossings; also attrs (C, A) and gamma (C,)."""
    corners = torch.tensor(CUBE_CORNERS, device=cubes.device)
    corner_index = _lookup(vertices, (cubes[:, None, :] + corners[None]).reshape(-1, 3)).reshape(-1, 8)
    defaults = torch.zeros(vertex_attrs.shape[1], device=cubes.device, dtype=vertex_attrs.dtype)
    defaults[0] = 1.0  # untouched grid vertices are outside
    attrs = torch.where((corner_index < 0)[..., None], defaults, vertex_attrs[corner_index.clamp(min=0)])  # (C, 8, A)
    position = (cubes[:, None, :] + corners[None]).to(attrs.dtype)
    position = position / resolution - 0.5 + (1 - 1e-8) / (2 * resolution) * torch.tanh(attrs[..., 1:4])
    cube_weights = _gather_or(weights, _lookup(active, cubes), 0.0)  # (C, 21), zero where no active cube
    beta = torch.tanh(cube_weights[:, :12]) * WEIGHT_SCALE + 1
    alpha = torch.tanh(cube_weights[:, 12:20]) * WEIGHT_SCALE + 1
    gamma = torch.sigmoid(cube_weights[:, 20]) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2
    edges = torch.tensor(CUBE_EDGES, device=cubes.device)
    sdf = attrs[..., 0]
    s0, s1 = sdf[:, edges[:, 0]], sdf[:, edges[:, 1]]  # (C, 12)
    w0, w1 = s0 * alpha[:, edges[:, 0]], s1 * alpha[:, edges[:, 1]]
    crosses = (s0 < 0) != (s1 < 0)
    denominator = torch.where(crosses, w1 - w0, torch.ones_like(w0))
    values = torch.cat([position, attrs[..., 4:]], dim=-1)  # (C, 8, 3 + colour)
    crossing = (values[:, edges[:, 0]] * w1[..., None] - values[:, edges[:, 1]] * w0[..., None]) / denominator[
        ..., None
    ]
    edge_weight = beta * crosses
    dual = (crossing * edge_weight[..., None]).sum(dim=1) / edge_weight.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return dual[:, :3], dual[:, 3:], gamma


def _triangulate(quads: torch.Tensor, gamma: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Quads (E, 4) -> triangles (2E, 3) split on the diagonal whose cubes' gamma product is larger."""
    g = gamma[quads]
    split_02 = (g[:, 0] * g[:, 2]) > (g[:, 1] * g[:, 3])
    along_02 = torch.stack([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]], dim=1)
    along_13 = torch.stack([quads[:, [0, 1, 3]], quads[:, [1, 2, 3]]], dim=1)
    triangles = torch.where(split_02[:, None, None], along_02, along_13)  # (E, 2, 3)
    triangles = torch.where(flip[:, None, None], triangles.flip(dims=[2]), triangles)
    return triangles.reshape(-1, 3)


def extract_mesh(coords: torch.Tensor, feats: torch.Tensor, resolution: int, use_color: bool) -> trimesh.Trimesh:
    """Active cubes (N, 3) [x, y, z] in [0, resolution) with features (N, channels) -> mesh in [-0.5, 0.5]^3.

    Vertex colours (RGB from the first 3 colour channels, clamped to [0, 1]) when `use_color`.
    """
    expected = cube_feature_channels(use_color)
    if feats.shape[1] != expected:
        raise ValueError(f"mesh features must have {expected} channels (use_color={use_color}), got {feats.shape[1]}")
    coords, feats = coords.long(), feats.float()
    sdf = feats[:, :8, None] - 1.0 / resolution  # TRELLIS's SDF bias of one voxel outwards
    deform = feats[:, 8:32].reshape(-1, 8, 3)
    weights = feats[:, 32:53]
    corner_attrs = [sdf, deform] + ([feats[:, 53:].reshape(-1, 8, COLOR_CHANNELS)] if use_color else [])
    vertices, vertex_attrs = _vertex_attributes(coords, torch.cat(corner_attrs, dim=-1))  # attrs: sdf, deform, colour
    lower, axis, inside_at_lower = _sign_change_edges(vertices, vertex_attrs[:, 0], resolution)
    ring, valid = _edge_quads(lower, axis, resolution)
    ring, inside_at_lower = ring[valid], inside_at_lower[valid]
    if ring.shape[0] == 0:
        logger.warning("mesh extraction found no surface among %d cubes; returning an empty mesh", coords.shape[0])
        return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64), process=False)
    cubes, quads = _unique_points(ring.reshape(-1, 3))
    positions, colors, gamma = _dual_vertices(cubes, vertices, vertex_attrs, coords, weights, resolution)
    faces = _triangulate(quads.reshape(-1, 4), gamma, ~inside_at_lower)
    vertex_colors = None
    if use_color:
        rgb = (colors[:, :3].detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        vertex_colors = np.concatenate([rgb, np.full((rgb.shape[0], 1), 255, dtype=np.uint8)], axis=1)
    return trimesh.Trimesh(
        vertices=positions.detach().cpu().numpy(), faces=faces.cpu().numpy(), vertex_colors=vertex_colors, process=False
    )
