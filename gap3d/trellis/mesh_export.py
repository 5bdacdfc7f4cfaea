"""Meshes -> file bytes (GLB, OBJ, PLY), with optional quadric simplification.

Simplification uses trimesh's quadric decimation, which needs the small `fast-simplification`
package; without it, asking for a face budget raises an error that says so (nothing else needs it).
"""

import importlib.util
import io

import trimesh

EXPORT_FORMATS = ("glb", "obj", "ply")
MEDIA_TYPES = {"glb": "model/gltf-binary", "obj": "model/obj", "ply": "application/ply"}


def simplify(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric-decimate `mesh` to at most about `target_faces` faces (unchanged if already below)."""
    if target_faces <= 0:
        raise ValueError(f"target_faces must be positive, got {target_faces}")
    if len(mesh.faces) <= target_faces:
        return mesh
    if importlib.util.find_spec("fast_simplification") is None:
        raise RuntimeError("mesh simplification needs the fast-simplification package: pip install fast-simplification (or pass target_faces=None)")
    return mesh.simplify_quadric_decimation(face_count=target_faces)


def export_mesh(mesh: trimesh.Trimesh, file_format: str = "glb", target_faces: int | None = None) -> bytes:
    """`mesh` as GLB / OBJ / PLY bytes, optionally simplified to `target_faces` first."""
    file_format = file_format.lower()
    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"unsupported mesh format {file_format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if len(mesh.faces) == 0:
        raise ValueError("cannot export an empty mesh (the decoded structure had no occupied voxels)")
    if target_faces is not None:
        mesh = simplify(mesh, target_faces)
    data = mesh.export(file_type=file_format)
    return data.encode() if isinstance(data, str) else bytes(data)


def load_mesh(data: bytes, file_format: str = "glb") -> trimesh.Trimesh:
    """Bytes written by `export_mesh` -> one Trimesh (a GLB scene is concatenated)."""
    loaded = trimesh.load(io.BytesIO(data), file_type=file_format, force="mesh")
    if not isinstance(loaded, trimesh.Trimesh):
        raise ValueError(f"{file_format} bytes did not hold a triangle mesh (got {type(loaded).__name__})")
    return loaded
