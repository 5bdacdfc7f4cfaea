"""tiny://trellis: a tiny TRELLIS whose stage 1 is trained on the synthetic world, so its structures follow the
condition.

The sparse-structure VAE learns the world's occupancy shells and the sparse-structure flow learns to produce their
latents from the tiny DINOv2's tokens of the renders (gap3d.trellis.stage1_training). This decoder plays the part
of the frozen, pretrained TRELLIS, which saw every kind of object: it trains on all shape x colour pairs, while
the aligner never sees the held-out pairs. Scenes are drawn with their own seed (STAGE1_SEED), so no object the
demo evaluates on was seen; EVAL_ROWS further held-out-pair scenes of that seed, not trained on, are scored at
build time. Stage 2 is left out: the release directory holds stage 1
only, which serve/config.yaml runs on CPU. `training.json` beside pipeline.json records the recipe, the loss
curve and the held-out scores measured at build time.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from gap3d.config import load_config
from gap3d.data.occupancy import downsample
from gap3d.dino import DinoTargetEncoder
from gap3d.trellis.stage1_training import Stage1Config, Stage1Trainer
from gap3d.trellis.structure_metrics import structure_metrics
from miniature.world import render_scene, sample_scene, scene_occupancy

logger = logging.getLogger(__name__)

STAGE1_SEED = 1  # the demo's synthetic data uses seed 0
STAGE1_SCENES = 2000  # scenes trained on
EVAL_ROWS = 150  # held-out scenes scored at build time
ENCODE_CHUNK = 64
TRAINING_RECORD = "training.json"


def world_structures(scenes: list, resolution: int, dino: DinoTargetEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupancy bool (n, R, R, R) and DINOv2 tokens of the renders (n, N, D) of `scenes`."""
    occupancy = torch.from_numpy(np.stack([downsample(scene_occupancy(scene), resolution) for scene in scenes]))
    tokens = []
    with torch.no_grad():
        for start in range(0, len(scenes), ENCODE_CHUNK):
            images = np.stack([render_scene(scene, dino.image_size) for scene in scenes[start : start + ENCODE_CHUNK]])
            tokens.append(dino.encode(images).float())
    return occupancy, torch.cat(tokens)


def write_trained_tiny_trellis(
    out_dir: str | Path, config: Stage1Config | None = None, num_scenes: int = STAGE1_SCENES
) -> Path:
    """Train stage 1 on the tiny preset's world and write the release directory at `out_dir`; returns its path."""
    from gap3d.trellis.decoder import Decoder

    config = config or Stage1Config()
    start = time.perf_counter()
    dino = DinoTargetEncoder.from_pretrained(load_config("tiny").dino)
    scenes = [sample_scene(STAGE1_SEED, index) for index in range(num_scenes)]
    later = (sample_scene(STAGE1_SEED, num_scenes + index) for index in range(10 * EVAL_ROWS))
    eval_scenes = [scene for scene in later if scene.split == "eval"][:EVAL_ROWS]
    occupancy, tokens = world_structures(scenes, config.resolution, dino)
    logger.info(
        "stage 1 data: %d scenes rendered, encoded and voxelised in %.0f s", len(scenes), time.perf_counter() - start
    )
    trainer = Stage1Trainer(config, occupancy, tokens)
    trainer.fit()
    root = trainer.write_release(out_dir)
    eval_occupancy, eval_tokens = world_structures(eval_scenes, config.resolution, dino)
    decoder = Decoder.from_pretrained(str(root), device="cpu", stages="coarse")
    decoded = decoder.sample_sparse_structure(eval_tokens, seed=list(range(len(eval_scenes)))).occupancy
    with torch.no_grad():
        reconstructed = trainer.decoder(trainer.encode(eval_occupancy))[:, 0] > 0
    shapes, reference_shapes = [s.shape for s in eval_scenes], [s.shape for s in scenes]
    record = {
        "recipe": {
            **{k: v for k, v in vars(config).items() if k != "sampler"},
            "sampler": config.sampler.to_json(),
            "scenes": num_scenes,
            "seed": STAGE1_SEED,
        },
        "train_scenes": len(scenes),
        "held_out": {
            "rows": len(eval_scenes),
            "vae_reconstruction": structure_metrics(reconstructed, eval_occupancy, shapes, occupancy, reference_shapes),
            "from_true_tokens": structure_metrics(decoded, eval_occupancy, shapes, occupancy, reference_shapes),
        },
        "loss_curve": [entry for entry in trainer.history if entry["step"] % 50 == 0],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (root / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    logger.info("tiny://trellis trained in %.0f s; held out: %s", record["seconds"], json.dumps(record["held_out"]))
    return root
