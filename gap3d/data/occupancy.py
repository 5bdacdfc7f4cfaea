"""3D ground truth in TRELLIS's frame: the voxels a mesh's surface passes through.

TRELLIS's sparse structure marks the voxels of a 64^3 grid over [-0.5, 0.5]^3 that the object's surface
crosses (a shell, not a solid). Voxel i has its centre at (i + 0.5) / R - 0.5, so a point p falls in voxel
floor((p + 0.5) * R), the convention gap3d.trellis.voxel_mesh meshes back. Grids are stored per sample as
`<key>.occupancy.npy`: the bool (R, R, R) grid packed eight voxels to a byte along the last axis (uint8
(R, R, R/8), np.packbits), 32 KiB at 64^3, with bytes that depend only on the grid.
"""

import io

import numpy as np

SURFACE_RESOLUTION = 64  # TRELLIS's sparse-structure grid side


def surface_voxels(vertices: np.ndarray, faces: np.ndarray, resolution: int = SURFACE_RESOLUTION) -> np.ndarray:
    """Vertices (V, 3) in [-0.5, 0.5]^3 and faces (F, 3) -> bool (R, R, R): voxels the surface crosses."""
    if vertices.size and np.abs(vertices).max() > 0.5 + 1e-6:
        raise ValueError(
            f"vertices must lie in TRELLIS's unit cube [-0.5, 0.5]^3, got extent {np.abs(vertices).max():.3f}"
        )
    corners = vertices[faces]  # (F, 3 corners, 3)
    longest = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=-1).max(axis=1)  # (F,)
    # A barycentric lattice with spacing under a third of a voxel leaves no crossed voxel unmarked.
    splits = np.maximum(1, np.ceil(longest * 3 * resolution)).astype(np.int64)
    grid = np.zeros((resolution,) * 3, dtype=bool)
    for n in np.unique(splits):
        i, j = np.triu_indices(n + 1)  # i <= j: (i, j - i) runs over the lattice i + k <= n
        weights = np.stack([i, j - i, n - j], axis=1) / n  # (P, 3) barycentric weights
        points = weights @ corners[splits == n]  # (F_n, P, 3)
        index = np.clip(np.floor((points + 0.5) * resolution).astype(np.int64), 0, resolution - 1)
        grid.reshape(-1)[((index[..., 0] * resolution + index[..., 1]) * resolution + index[..., 2]).ravel()] = True
    return grid


def downsample(grid: np.ndarray, resolution: int) -> np.ndarray:
    """bool (R, R, R) -> bool (r, r, r), r dividing R: a coarse voxel is occupied when any of its fine voxels is."""
    side = grid.shape[0]
    if side % resolution:
        raise ValueError(f"cannot downsample a {side}^3 grid to {resolution}^3: {resolution} does not divide {side}")
    factor = side // resolution
    return grid.reshape(resolution, factor, resolution, factor, resolution, factor).any(axis=(1, 3, 5))


def encode_occupancy(grid: np.ndarray) -> bytes:
    """The `<key>.occupancy.npy` member of a bool (R, R, R) grid."""
    buffer = io.BytesIO()
    np.save(buffer, np.packbits(grid.astype(bool), axis=-1))
    return buffer.getvalue()


def decode_occupancy(payload: bytes, where: str = "occupancy member") -> np.ndarray:
    """bool (R, R, R) from `<key>.occupancy.npy` bytes; `where` names the member in errors."""
    try:
        packed = np.load(io.BytesIO(payload), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where} is not an .npy array: {err}") from err
    if (
        packed.dtype != np.uint8
        or packed.ndim != 3
        or packed.shape[0] != packed.shape[1]
        or packed.shape[2] * 8 != packed.shape[0]
    ):
        raise ValueError(
            f"{where} holds {packed.dtype} {packed.shape}; expected uint8 (R, R, R/8), a bool cube packed along the "
            "last axis"
        )
    return np.unpackbits(packed, axis=-1).astype(bool)


def read_occupancy(uri: str, keys: set[str] | None = None) -> dict[str, np.ndarray]:
    """key -> bool (R, R, R) for the `<key>.occupancy.npy` members of the tar shards at `uri` (directory or glob)."""
    import tarfile

    from gap3d import storage
    from gap3d.data.shards import list_shards, split_member_name

    grids = {}
    for shard in list_shards(uri):
        if shard.format != "webdataset":
            continue
        fs, path = storage.filesystem(shard.uri)
        try:
            with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
                for member in tar:
                    key, extension = split_member_name(member.name)
                    if extension == "occupancy.npy" and (keys is None or key in keys):
                        grids[key] = decode_occupancy(tar.extractfile(member).read(), f"{shard.uri}: {member.name}")
        except tarfile.TarError as err:
            raise ValueError(f"{shard.uri} is not a readable tar shard: {err}") from err
    return grids
