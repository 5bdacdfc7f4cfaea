"""tiny://trellis: the shipped release, trained on the synthetic world, decodes every shape of unseen objects from
their renders' tokens; it was trained on these tiny encoders, and the recipe that rebuilds it still runs."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gap3d.checkpoints import fingerprint
from gap3d.config import load_config
from gap3d.data.occupancy import downsample
from gap3d.dino import DinoTargetEncoder
from gap3d.trellis.config import SLAT_DECODER_MESH, SLAT_FLOW, PipelineConfig
from gap3d.trellis.decoder import Decoder
from gap3d.trellis.loading import build_model
from gap3d.trellis.stage1_training import Stage1Config
from gap3d.trellis.stage2_training import SLAT_ENCODER, Stage2Config
from gap3d.trellis.structure_metrics import nearest_labels, occupancy_iou
from miniature.checkpoints import tiny_checkpoint
from miniature.checkpoints.trained_trellis import (
    RECIPE,
    TRAINING_RECORD,
    TinyTrellisRecipe,
    recipe_record,
    rescore_release,
    stage2_scores,
    world_structures,
    write_trained_tiny_trellis,
)
from miniature.checkpoints.trellis import randomize, write_tiny_trellis
from miniature.world import SHAPES, sample_scene

ROWS = 96  # held-out-pair objects, 16 per shape on average
FULL_ROWS = 12  # held-out-pair objects run through the full pipeline (stage 2 decodes take about a second each)
SEEDS = (0, 1000)
# The builder end to end in seconds: few scenes and steps, narrow flows.
SHORT_RECIPE = TinyTrellisRecipe(
    stage1=Stage1Config(vae_steps=20, flow_steps=30, flow_batch_size=8, flow_width=32, flow_blocks=1, flow_heads=2),
    scenes=48,
    stage2=Stage2Config(vae_steps=4, flow_steps=4, flow_batch_size=2, flow_width=32, flow_blocks=1, flow_heads=2),
    stage2_scenes=4,
    eval_rows=12,
)


@pytest.fixture(scope="module")
def shipped():
    return tiny_checkpoint("trellis")


@pytest.fixture(scope="module")
def trained(shipped) -> Decoder:
    return Decoder.from_pretrained(str(shipped), device="cpu", stages="coarse")


@pytest.fixture(scope="module")
def unseen_objects():
    """Held-out-pair scenes of a seed neither the decoder nor the demo uses: (64^3 occupancy, tokens, shapes)."""
    scenes = [s for s in (sample_scene(9, index) for index in range(6 * ROWS)) if s.split == "eval"][:ROWS]
    dino = DinoTargetEncoder.from_pretrained(load_config("tiny").dino)
    occupancy, tokens = world_structures(scenes, 64, dino)
    return occupancy, tokens, [scene.shape for scene in scenes]


@pytest.fixture(scope="module")
def unseen_assets_objects(shipped):
    """Held-out-pair scenes of seed 9 for the full pipeline: (scenes, occupancy at the stage-1 grid, tokens)."""
    scenes = [s for s in (sample_scene(9, index) for index in range(6 * FULL_ROWS)) if s.split == "eval"][:FULL_ROWS]
    dino = DinoTargetEncoder.from_pretrained(load_config("tiny").dino)
    occupancy, tokens = world_structures(scenes, RECIPE.stage1.resolution, dino)
    return scenes, occupancy, tokens


def decoded(decoder: Decoder, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    return decoder.sample_sparse_structure(tokens, seed=list(range(seed, seed + len(tokens)))).occupancy


def truth_at(decoder: Decoder, occupancy: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack([downsample(grid, decoder.structure_resolution) for grid in occupancy.numpy()]))


def test_the_shipped_release_was_trained_on_these_tiny_encoders_with_the_shipped_recipe(shipped):
    record = json.loads((shipped / TRAINING_RECORD).read_text())
    dino = load_config("tiny").dino
    assert record["encoders"] == {"dino": fingerprint(dino.path), "dino_image_size": dino.image_size}
    assert record["recipe"] == recipe_record(RECIPE)


@pytest.fixture(scope="module")
def short_release(tmp_path_factory) -> Path:
    return write_trained_tiny_trellis(tmp_path_factory.mktemp("short"), SHORT_RECIPE)


def test_the_recipe_builds_a_release_the_decoder_loads_with_its_training_record(short_release, shipped):
    decoder = Decoder.from_pretrained(str(short_release), device="cpu", stages="full")
    assert decoder.cond_dim == DinoTargetEncoder.from_pretrained(load_config("tiny").dino).dim
    record = json.loads((short_release / TRAINING_RECORD).read_text())
    assert record.keys() == json.loads((shipped / TRAINING_RECORD).read_text()).keys()
    assert record["recipe"] == recipe_record(SHORT_RECIPE)


def test_rescoring_with_the_recipe_it_was_built_with_reproduces_the_builds_record(short_release, tmp_path):
    root = shutil.copytree(short_release, tmp_path / "release")
    built = json.loads((short_release / TRAINING_RECORD).read_text())
    erased = json.loads(json.dumps(built))
    erased["held_out"]["stage1"]["from_true_tokens"], erased["held_out"]["stage2"] = {}, {}
    (root / TRAINING_RECORD).write_text(json.dumps(erased))  # what the re-scoring must measure again
    assert rescore_release(root, SHORT_RECIPE) == built
    assert (root / "pipeline.json").read_text() == (short_release / "pipeline.json").read_text()


def test_rescoring_writes_the_recipes_new_samplers_and_keeps_what_training_measured(short_release, tmp_path):
    root = shutil.copytree(short_release, tmp_path / "release")
    built = json.loads((short_release / TRAINING_RECORD).read_text())
    sampler = dataclasses.replace(SHORT_RECIPE.stage1.sampler, steps=3)
    recipe = dataclasses.replace(SHORT_RECIPE, stage1=dataclasses.replace(SHORT_RECIPE.stage1, sampler=sampler))
    record = rescore_release(root, recipe)
    assert PipelineConfig.load(root).sparse_structure_sampler.steps == 3
    assert record["recipe"] == recipe_record(recipe) == json.loads((root / TRAINING_RECORD).read_text())["recipe"]
    assert record["loss_curve"] == built["loss_curve"] and record["seconds"] == built["seconds"]
    assert record["held_out"]["stage1"]["vae_reconstruction"] == built["held_out"]["stage1"]["vae_reconstruction"]


def test_rescoring_refuses_a_release_another_recipe_trained(short_release, tmp_path):
    root = shutil.copytree(short_release, tmp_path / "release")
    other = dataclasses.replace(SHORT_RECIPE, scenes=SHORT_RECIPE.scenes + 1)
    with pytest.raises(ValueError, match="another recipe"):
        rescore_release(root, other)
    assert (root / "pipeline.json").read_text() == (short_release / "pipeline.json").read_text()


@pytest.mark.parametrize("seed", SEEDS)
def test_every_shape_of_unseen_objects_decodes_from_true_tokens(trained, unseen_objects, seed):
    occupancy, tokens, shapes = unseen_objects
    structures = decoded(trained, tokens, seed)
    truth = truth_at(trained, occupancy)
    named = nearest_labels(structures, truth, shapes)
    iou = occupancy_iou(structures, truth)
    for shape in SHAPES:
        rows = [i for i, s in enumerate(shapes) if s == shape]
        accuracy = np.mean([named[i] == shape for i in rows])
        assert accuracy >= 0.9 and float(iou[rows].mean()) >= 0.6, (shape, accuracy, float(iou[rows].mean()))


def test_structures_from_true_tokens_beat_a_random_weight_decoder_by_a_wide_margin(trained, unseen_objects, tmp_path):
    occupancy, tokens, _ = unseen_objects
    release = write_tiny_trellis(tmp_path, cond_dim=tokens.shape[-1], stage2=False)
    random = Decoder.from_pretrained(str(release), device="cpu", stages="coarse")
    trained_iou = occupancy_iou(decoded(trained, tokens, 0), truth_at(trained, occupancy))
    random_iou = occupancy_iou(decoded(random, tokens, 0), truth_at(random, occupancy))
    assert float(trained_iou.mean()) > 5 * float(random_iou.mean())


def test_the_condition_decides_the_structure(trained, unseen_objects):
    # Same noise, two objects of different shapes: the structures differ.
    _, tokens, shapes = unseen_objects
    first = shapes.index("cube")
    other = next(i for i, shape in enumerate(shapes) if shape != "cube")
    both = trained.sample_sparse_structure(tokens[[first, other]], seed=[0, 0]).occupancy
    assert (both[0] != both[1]).float().mean() > 0.01


def with_random_stage2(release, out):
    """A copy of `release` whose stage-2 models (structured-latent encoder, mesh decoder, flow) get random weights."""
    shutil.copytree(release, out)
    pipeline = PipelineConfig.load(out)
    for name in (SLAT_ENCODER, SLAT_DECODER_MESH, SLAT_FLOW):
        spec = json.loads((out / f"{pipeline.models[name]}.json").read_text())
        model = build_model(spec)
        randomize(model, torch.Generator().manual_seed(0))
        save_file(
            {key: value.contiguous() for key, value in model.state_dict().items()},
            str(out / f"{pipeline.models[name]}.safetensors"),
        )
    return out


def test_stage2_gives_unseen_objects_their_colour_and_shape_far_above_random_weights(
    shipped, unseen_assets_objects, tmp_path
):
    scenes, occupancy, tokens = unseen_assets_objects
    trained = stage2_scores(shipped, scenes, occupancy, tokens)
    random = stage2_scores(with_random_stage2(shipped, tmp_path / "random"), scenes, occupancy, tokens)
    # The shipped stage 2 gives every colour its own (150 held-out objects of its recipe's seed: 1.00 each).
    assert min(trained["color"]["per_class"].values()) >= 0.8, trained["color"]
    assert trained["color"]["accuracy"] >= max(random["color"]["accuracy"] + 0.5, 3 * random["color"]["accuracy"]), (
        trained["color"],
        random["color"],
    )
    # A random stage 2 still meshes inside stage 1's (trained) structure, so its IoU is far from zero (0.26).
    assert trained["structure"]["iou"] >= random["structure"]["iou"] + 0.15, (trained["structure"], random["structure"])
