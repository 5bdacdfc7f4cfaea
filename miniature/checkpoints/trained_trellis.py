"""tiny://trellis: a tiny TRELLIS trained on the synthetic world, so its assets follow the condition.

Stage 1: the sparse-structure VAE learns the world's occupancy shells and the sparse-structure flow learns to produce
their latents from the tiny DINOv2's tokens of the renders (gap3d.trellis.stage1_training). Stage 2: the
structured-latent VAE learns the objects' signed distances and colours on their voxels, and its flow learns to produce
those latents from the same tokens (gap3d.trellis.stage2_training, data from miniature.checkpoints.stage2_data).
This decoder plays the part of the frozen, pretrained TRELLIS, which saw every kind of object: it trains on all shape x
colour pairs, while the aligner never sees the held-out pairs. Scenes are drawn with their own seed (STAGE1_SEED), so
no object the demo evaluates on was seen; further held-out-pair scenes of that seed, not trained on, are scored at
build time. `training.json` beside pipeline.json records the recipe, the fingerprint of the tiny DINOv2
whose tokens it was trained on, the loss curves and the held-out scores measured at build time.

The full recipe (RECIPE) takes longer than a CI run allows, so its release is shipped in this package
(SHIPPED_RELEASE, weights in float16) and rebuilt with `python -m cli make-tiny --trained --out DIR`.
"""

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gap3d.checkpoints import fingerprint
from gap3d.config import load_config
from gap3d.data.occupancy import downsample
from gap3d.dino import DinoTargetEncoder
from gap3d.metrics import class_report
from gap3d.trellis.config import PipelineConfig
from gap3d.trellis.stage1_training import Stage1Config, Stage1Trainer
from gap3d.trellis.stage2_training import Stage2Config, Stage2Trainer
from gap3d.trellis.structure_metrics import structure_metrics
from miniature.checkpoints.stage2_data import scene_fields, stage2_voxels, voxel_features
from miniature.scoring import dominant_color, mesh_structure
from miniature.world import COLORS, render_scene, sample_scene, scene_occupancy

logger = logging.getLogger(__name__)

STAGE1_SEED = 1  # the demo's synthetic data uses seed 0
ENCODE_CHUNK = 64
TRAINING_RECORD = "training.json"
SHIPPED_RELEASE = Path(__file__).resolve().parent / "tiny_trellis"


@dataclass(frozen=True)
class TinyTrellisRecipe:
    stage1: Stage1Config  # the sparse-structure VAE and flow
    scenes: int  # scenes stage 1 trains on
    stage2: Stage2Config | None  # the structured-latent VAE and flow; None: a stage-1 release
    stage2_scenes: int  # the first of those scenes stage 2 trains on (each costs renders of VIEWS views)
    eval_rows: int = 150  # held-out-pair scenes of the same seed, not trained on, scored at build time


# The shipped release's recipe: a wider stage-1 flow trained longer on more scenes than Stage1Config's defaults, so
# that it reads each object's turn from its render; stage 2 on a grid half stage 1's, for the CPU, its VAE on batches of
# objects so that colour is learned beside shape (docs/miniature.md).
RECIPE = TinyTrellisRecipe(
    stage1=Stage1Config(
        vae_steps=500, flow_width=160, flow_blocks=6, flow_heads=5, flow_steps=5000, flow_batch_size=32
    ),
    scenes=4000,
    stage2=Stage2Config(vae_steps=2000, vae_batch_size=4, crop=6, vae_lr=5e-4, color_weight=3.0),
    stage2_scenes=800,
)


def recipe_scenes(recipe: TinyTrellisRecipe) -> tuple[list, list]:
    """(the scenes the recipe trains on, the held-out-pair scenes after them that it is scored on)."""
    scenes = [sample_scene(STAGE1_SEED, index) for index in range(recipe.scenes)]
    later = (sample_scene(STAGE1_SEED, recipe.scenes + index) for index in range(10 * recipe.eval_rows))
    return scenes, [scene for scene in later if scene.split == "eval"][: recipe.eval_rows]


def world_occupancy(scenes: list, resolution: int) -> torch.Tensor:
    """Occupancy bool (n, R, R, R) of `scenes`."""
    return torch.from_numpy(np.stack([downsample(scene_occupancy(scene), resolution) for scene in scenes]))


def world_structures(scenes: list, resolution: int, dino: DinoTargetEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupancy bool (n, R, R, R) and DINOv2 tokens of the renders (n, N, D) of `scenes`."""
    occupancy = world_occupancy(scenes, resolution)
    tokens = []
    with torch.no_grad():
        for start in range(0, len(scenes), ENCODE_CHUNK):
            images = np.stack([render_scene(scene, dino.image_size) for scene in scenes[start : start + ENCODE_CHUNK]])
            tokens.append(dino.encode(images).float())
    return occupancy, torch.cat(tokens)


def recipe_record(recipe: TinyTrellisRecipe) -> dict:
    """The recipe as training.json records it."""

    def section(config) -> dict | None:
        if config is None:
            return None
        values = {k: v for k, v in dataclasses.asdict(config).items() if k != "sampler"}
        return {**values, "sampler": config.sampler.to_json()}

    return {
        "stage1": section(recipe.stage1),
        "scenes": recipe.scenes,
        "stage2": section(recipe.stage2),
        "stage2_scenes": recipe.stage2_scenes,
        "seed": STAGE1_SEED,
    }


def write_trained_tiny_trellis(
    out_dir: str | Path, recipe: TinyTrellisRecipe = RECIPE, dtype: torch.dtype = torch.float16
) -> Path:
    """Train the tiny TRELLIS on the world and write the release directory at `out_dir` (weights in `dtype`)."""
    start = time.perf_counter()
    dino_config = load_config("tiny").dino
    dino = DinoTargetEncoder.from_pretrained(dino_config)
    scenes, eval_scenes = recipe_scenes(recipe)
    occupancy, tokens = world_structures(scenes, recipe.stage1.resolution, dino)
    logger.info(
        "stage 1 data: %d scenes rendered, encoded and voxelised in %.0f s", len(scenes), time.perf_counter() - start
    )
    stage1 = Stage1Trainer(recipe.stage1, occupancy, tokens)
    stage1.fit()
    root = stage1.write_release(out_dir, dtype)
    eval_occupancy, eval_tokens = world_structures(eval_scenes, recipe.stage1.resolution, dino)
    record = {
        "recipe": recipe_record(recipe),
        "encoders": {"dino": fingerprint(dino_config.path), "dino_image_size": dino_config.image_size},
        "held_out": {
            "rows": len(eval_scenes),
            "stage1": stage1_scores(root, stage1, eval_scenes, eval_occupancy, eval_tokens, scenes, occupancy),
        },
        "loss_curve": {"stage1": [entry for entry in stage1.history if entry["step"] % 50 == 0]},
    }
    if recipe.stage2 is not None:
        stage2 = train_stage2(
            recipe.stage2,
            scenes[: recipe.stage2_scenes],
            tokens[: recipe.stage2_scenes],
            recipe.stage1.resolution,
            dino,
        )
        stage2.add_to_release(root, dtype)
        record["held_out"]["stage2"] = stage2_scores(root, eval_scenes, eval_occupancy, eval_tokens)
        record["loss_curve"]["stage2"] = [entry for entry in stage2.history if entry["step"] % 50 == 0]
    record["seconds"] = round(time.perf_counter() - start, 1)
    (root / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    logger.info("tiny://trellis trained in %.0f s; held out: %s", record["seconds"], json.dumps(record["held_out"]))
    return root


def train_stage2(
    config: Stage2Config, scenes: list, tokens: torch.Tensor, structure_resolution: int, dino
) -> Stage2Trainer:
    """Stage 2 trained on `scenes` (their render tokens `tokens`): voxels, multiview features and fields."""
    start = time.perf_counter()
    voxels = [stage2_voxels(scene, structure_resolution, config.resolution) for scene in scenes]
    features = [voxel_features(scene, v, config.resolution, dino) for scene, v in zip(scenes, voxels)]
    fields = [scene_fields(scene) for scene in scenes]
    logger.info(
        "stage 2 data: %d objects' voxels and view features in %.0f s", len(scenes), time.perf_counter() - start
    )
    trainer = Stage2Trainer(config, voxels, features, tokens, lambda index, points: fields[index](points))
    trainer.fit()
    return trainer


def stage1_scores(
    root: Path, trainer: Stage1Trainer, eval_scenes, eval_occupancy, eval_tokens, scenes, occupancy
) -> dict:
    """Held-out structures: the VAE's reconstruction, and the release's stage 1 from the true tokens."""
    with torch.no_grad():
        reconstructed = trainer.decoder(trainer.encode(eval_occupancy))[:, 0] > 0
    shapes, reference_shapes = [s.shape for s in eval_scenes], [s.shape for s in scenes]
    return {
        "vae_reconstruction": structure_metrics(reconstructed, eval_occupancy, shapes, occupancy, reference_shapes),
        "from_true_tokens": stage1_decoded_scores(root, eval_scenes, eval_occupancy, eval_tokens, scenes, occupancy),
    }


def stage1_decoded_scores(root: Path, eval_scenes, eval_occupancy, eval_tokens, scenes, occupancy) -> dict:
    """The release's stage-1 structures from the held-out true tokens (structure_metrics, shapes named by the
    nearest training grid)."""
    from gap3d.trellis.decoder import Decoder

    decoder = Decoder.from_pretrained(str(root), device="cpu", stages="coarse")
    decoded = decoder.sample_sparse_structure(eval_tokens, seed=list(range(len(eval_scenes)))).occupancy
    shapes, reference_shapes = [s.shape for s in eval_scenes], [s.shape for s in scenes]
    return structure_metrics(decoded, eval_occupancy, shapes, occupancy, reference_shapes)


def stage2_scores(root: Path, eval_scenes, eval_occupancy, eval_tokens) -> dict:
    """Held-out full-pipeline meshes from the true tokens: their colour (dominant vertex colour, nearest palette
    colour) and their structure on the stage-1 grid (IoU, shape)."""
    from gap3d.trellis.decoder import Decoder

    decoder = Decoder.from_pretrained(str(root), device="cpu", stages="full")
    meshes = []
    for start in range(0, len(eval_scenes), 16):
        chunk = eval_tokens[start : start + 16]
        meshes += decoder.generate(chunk, seed=list(range(start, start + len(chunk))), stage="full", allow_empty=True)
    resolution = eval_occupancy.shape[1]
    structures = torch.stack([mesh_structure(mesh, resolution) for mesh in meshes])
    shapes = [s.shape for s in eval_scenes]
    colors = [dominant_color(mesh, COLORS) or "none" for mesh in meshes]
    return {
        "structure": structure_metrics(structures, eval_occupancy, shapes, eval_occupancy, shapes),
        "color": class_report([s.color for s in eval_scenes], colors),
    }


def rescore_release(root: str | Path, recipe: TinyTrellisRecipe = RECIPE) -> dict:
    """Write the recipe's samplers into the release that `recipe` trained at `root` and score it again on the held-out
    scenes, as the build does: a sampler is not trained, so changing one needs no retraining. What training measured
    (the VAE's reconstruction, the loss curves, the build's seconds) is kept. Returns the new training record."""
    root = Path(root)
    record = json.loads((root / TRAINING_RECORD).read_text())
    if _without_samplers(record["recipe"]) != _without_samplers(recipe_record(recipe)):
        raise ValueError(
            f"{root / TRAINING_RECORD} records another recipe than the one given; only the samplers may differ "
            "(rebuild with `python -m cli make-tiny --trained`)"
        )
    pipeline = PipelineConfig.load(root)
    pipeline.sparse_structure_sampler = recipe.stage1.sampler
    if recipe.stage2 is not None:
        pipeline.slat_sampler = recipe.stage2.sampler
    pipeline.save(root)
    dino = DinoTargetEncoder.from_pretrained(load_config("tiny").dino)
    scenes, eval_scenes = recipe_scenes(recipe)
    resolution = recipe.stage1.resolution
    occupancy = world_occupancy(scenes, resolution)
    eval_occupancy, eval_tokens = world_structures(eval_scenes, resolution, dino)
    held_out = record["held_out"]
    held_out["stage1"]["from_true_tokens"] = stage1_decoded_scores(
        root, eval_scenes, eval_occupancy, eval_tokens, scenes, occupancy
    )
    if recipe.stage2 is not None:
        held_out["stage2"] = stage2_scores(root, eval_scenes, eval_occupancy, eval_tokens)
    record["recipe"] = recipe_record(recipe)
    (root / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    logger.info("%s re-scored with the recipe's samplers; held out: %s", root, json.dumps(held_out))
    return record


def _without_samplers(recipe: dict) -> dict:
    return {
        key: {k: v for k, v in value.items() if k != "sampler"} if isinstance(value, dict) else value
        for key, value in recipe.items()
    }
