"""The synthetic world's objects as mesh files with a captions CSV: the input `python -m cli make-evalset` reads.

Each object is written as `<key>.ply`, already in TRELLIS's frame (z up, unit cube; make-evalset's --up-axis z), its
colour in every vertex; `captions.csv` names it by file_identifier with its caption (a one-element JSON list, the
layout of TRELLIS-500K's Toys4k.csv). `conditions/<key>.png` is the object's image in the world (render_scene): the
look the tiny TRELLIS and the aligner were trained on, which the reference arm is conditioned on (--cond-images).
"""

import csv
import json
from pathlib import Path

import numpy as np

from miniature.shards import encode_png
from miniature.world import COLORS, object_mesh, render_scene, sample_scene


def write_scene_meshes(
    out_dir: str | Path, seed: int, indices: list[int], image_size: int = 224
) -> tuple[Path, Path, Path]:
    """Write the scenes (seed, index) as PLY files, their images (`image_size` px) and captions.csv under `out_dir`;
    returns (mesh dir, csv path, image dir)."""
    import trimesh

    root = Path(out_dir)
    meshes, conditions = root / "meshes", root / "conditions"
    meshes.mkdir(parents=True, exist_ok=True)
    conditions.mkdir(exist_ok=True)
    rows = []
    for index in indices:
        scene = sample_scene(seed, index)
        vertices, faces = object_mesh(scene)
        colors = np.tile(np.round(np.array(COLORS[scene.color]) * 255).astype(np.uint8), (len(vertices), 1))
        name = f"{index:08d}.ply"
        trimesh.Trimesh(vertices, faces, vertex_colors=colors, process=False).export(meshes / name)
        (conditions / f"{index:08d}.png").write_bytes(encode_png(render_scene(scene, image_size)))
        rows.append({"file_identifier": name, "captions": json.dumps([scene.caption])})
    captions = root / "captions.csv"
    with open(captions, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_identifier", "captions"])
        writer.writeheader()
        writer.writerows(rows)
    return meshes, captions, conditions


def held_out_indices(seed: int, num: int) -> list[int]:
    """Indices of the eval split (held-out shape x colour pairs) among the world's first `num` samples."""
    return [index for index in range(num) if sample_scene(seed, index).split == "eval"]
