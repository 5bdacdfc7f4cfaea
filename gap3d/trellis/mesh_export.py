"""Meshes -> file bytes (GLB, OBJ, PLY), simplified by default to a face budget.

Extracted meshes are dense (10^5 - 10^6 faces); `export_mesh` quadric-decimates them to
DEFAULT_TARGET_FACES (pass target_faces=None to keep every face) with the `fast-simplification`
package, carrying vertex colours over by averaging the colours of the vertices each kept vertex absorbed.
GLBs carry vertex normals beside the positions.
"""

import importlib
import importlib.util
import io
import math
import threading

import numpy as np
import trimesh

EXPORT_FORMATS = ("glb", "obj", "ply")
# Default face budget of exported meshes: a GLB of about 1 MB with vertex colours, still smooth
# (TRELLIS's own GLB export keeps about 5% of its extracted faces, a similar count).
DEFAULT_TARGET_FACES = 50_000
MEDIA_TYPES = {"glb": "model/gltf-binary", "obj": "model/obj", "ply": "application/ply"}
# fast-simplification is not thread-safe: two threads in it corrupt the heap (a served replica runs
# overlapping requests in a thread pool), so every call into it holds this lock.
_SIMPLIFY_LOCK = threading.Lock()


def simplify(mesh: trimesh.Trimesh, target_faces: int | None = None, tolerance: float | None = None) -> trimesh.Trimesh:
    """Quadric-decimate `mesh` to at most about `target_faces` faces (unchanged if already below), keeping vertex
    colours; with `tolerance`, collapse only edges whose quadric error stays below about tolerance^2 (distance
    units), so a flat cube keeps few faces and a sphere more: the face count fits the shape."""
    if target_faces is None and tolerance is None:
        raise ValueError("simplify needs target_faces, tolerance or both")
    if target_faces is not None and target_faces <= 0:
        raise ValueError(f"target_faces must be positive, got {target_faces}")
    if tolerance is not None and tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    if target_faces is not None and len(mesh.faces) <= target_faces and tolerance is None:
        return mesh
    if importlib.util.find_spec("fast_simplification") is None:
        raise RuntimeError(
            "mesh simplification needs the fast-simplification package: pip install fast-simplification (or pass "
            "target_faces=None)"
        )
    fast_simplification = importlib.import_module("fast_simplification")
    points, triangles = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    # fast-simplification raises its collapse threshold from 1e-9 by (iteration + 3)^agg over 100 iterations, so the
    # aggressiveness that ends at tolerance^2 bounds every collapse's error.
    agg = 7.0 if tolerance is None else math.log(tolerance**2 / 1e-9) / math.log(102.0)
    target = {"target_count": target_faces} if target_faces is not None else {"target_reduction": 0.999}
    with _SIMPLIFY_LOCK:
        _, _, collapses = fast_simplification.simplify(points, triangles, agg=agg, return_collapses=True, **target)
        # Replaying the collapses gives the same mesh plus the kept vertex each original vertex merged into.
        vertices, faces, merged_into = fast_simplification.replay_simplification(points, triangles, collapses)
    colors = None
    if mesh.visual.kind == "vertex":
        kept = merged_into >= 0
        sums = np.zeros((len(vertices), 4))
        np.add.at(sums, merged_into[kept], mesh.visual.vertex_colors[kept].astype(np.float64))
        counts = np.bincount(merged_into[kept], minlength=len(vertices))[:, None]
        colors = np.round(sums / np.maximum(counts, 1)).astype(np.uint8)
    simplified = trimesh.Trimesh(vertices=vertices, faces=faces[_unfolded(faces)], vertex_colors=colors, process=False)
    simplified.remove_unreferenced_vertices()
    return simplified


def _unfolded(faces: np.ndarray) -> np.ndarray:
    """(F,) mask dropping faces that share all three vertices with another face.

    Collapsing a thin sheet leaves two back-to-back copies of one triangle; their edges then join four faces and
    the mesh stops being watertight. Without both copies the surface on either side closes again.
    """
    _, inverse, counts = np.unique(np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] == 1


def export_mesh(
    mesh: trimesh.Trimesh, file_format: str = "glb", target_faces: int | None = DEFAULT_TARGET_FACES
) -> bytes:
    """`mesh` as GLB / OBJ / PLY bytes, simplified to about `target_faces` faces first (None: keep all)."""
    file_format = file_format.lower()
    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"unsupported mesh format {file_format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if len(mesh.faces) == 0:
        raise ValueError("cannot export an empty mesh (the decoded structure had no occupied voxels)")
    if target_faces is not None:
        simplified = simplify(mesh, target_faces)
        # A budget below what the shape can keep collapses it to nothing: grow the budget rather than export nothing.
        while len(simplified.faces) == 0 and target_faces < len(mesh.faces):
            target_faces *= 2
            simplified = simplify(mesh, target_faces)
        mesh = simplified
    options = {"include_normals": True} if file_format == "glb" else {}
    data = mesh.export(file_type=file_format, **options)
    return data.encode() if isinstance(data, str) else bytes(data)


def load_mesh(data: bytes, file_format: str = "glb") -> trimesh.Trimesh:
    """Bytes written by `export_mesh` -> one Trimesh (a GLB scene is concatenated)."""
    loaded = trimesh.load(io.BytesIO(data), file_type=file_format, force="mesh")
    if not isinstance(loaded, trimesh.Trimesh):
        raise ValueError(f"{file_format} bytes did not hold a triangle mesh (got {type(loaded).__name__})")
    return loaded
