"""Table 3 in the miniature: the demo's held-out objects as an evaluation set, then the 3D evaluation job.

`run_miniature_table3` is what the demo calls after training: it writes the held-out scenes of the synthetic world
as mesh files, their images and a captions CSV (miniature.meshes), builds the evaluation set from them exactly as
`python -m cli make-evalset --cond-images` does (gap3d.evalset: the reference arm conditioned on each object's image
in the world, the look the tiny TRELLIS was trained on), and runs ray_jobs.evaluate_3d.run_table3 on it (a Ray
cluster must be up). Renders are 256 px here, where the paper's are 512 (the tiny DINOv2 reads 112 px), and four views
per object, where the paper's are eight (see MINIATURE_PROTOCOL): CPU time is short.
"""

from pathlib import Path

from gap3d.config import Gap3DConfig
from gap3d.dino import DinoTargetEncoder
from gap3d.evalset import assets_from_files, write_eval_set
from gap3d.render import Protocol
from miniature.meshes import held_out_indices, write_scene_meshes
from ray_jobs.evaluate_3d import run_table3
from ray_jobs.table3_stages import TABLE3_PRESETS, Table3Settings

# 256 px, and only the four views FD and KD use (yaws 0/90/180/270, the same as of the paper's eight): the CLIP
# score, the one metric the other four views feed, is plumbing only on the tiny random CLIP, and rendering is most
# of the job's time on a CPU.
MINIATURE_PROTOCOL = Protocol(resolution=256, views=4, fd_every=1)


def build_miniature_eval_set(workdir: Path, config: Gap3DConfig, seed: int, num_samples: int, limit: int | None) -> str:
    """The held-out scenes among the world's first `num_samples` (at most `limit`) as an evaluation set; its URI."""
    indices = held_out_indices(seed, num_samples)[:limit]
    meshes, captions, images = write_scene_meshes(workdir / "table3_meshes", seed, indices, config.dino.image_size)
    dino = DinoTargetEncoder.from_pretrained(config.dino)
    out = str(workdir / "evalset")
    assets = assets_from_files(str(meshes), str(captions), seed, up_axis="z", cond_images=str(images))
    # The world's images as they are: the look the tiny TRELLIS was trained on (uncropped renders of the world).
    write_eval_set(out, assets, MINIATURE_PROTOCOL, dino, config.dino.path, seed, crop_cond_images=False)
    return out


def run_miniature_table3(
    workdir: Path,
    checkpoint: str,
    trellis: str,
    config: Gap3DConfig,
    seed: int = 0,
    num_samples: int = 1000,
    limit: int | None = None,
    settings: Table3Settings | None = None,
) -> dict:
    """Table 3 of a miniature run: its report (also at <workdir>/table3/table3.json, with contact_sheet.png)."""
    eval_set = build_miniature_eval_set(Path(workdir), config, seed, num_samples, limit)
    return run_table3(checkpoint, trellis, eval_set, str(Path(workdir) / "table3"), settings or TABLE3_PRESETS["tiny"])
