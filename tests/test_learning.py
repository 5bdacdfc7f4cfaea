"""The method in miniature, as a test that can fail: a short in-process run on the tiny world must learn to use
the prompt on held-out shape x colour pairs, and the same run with captions shuffled across images must not.

Recall@5 is text->image retrieval on centred embeddings (chance 5 / eval rows); see gap3d.metrics.
"""

import pytest

from gap3d.build import derive_shapes
from gap3d.config import load_config
from miniature.experiment import encode_world, score, train_in_process

STEPS = 400
NUM_SCENES = 600


@pytest.fixture(scope="module")
def config():
    return derive_shapes(load_config("tiny", overrides=[f"train.max_steps={STEPS}"]))


@pytest.fixture(scope="module")
def world(config):
    return encode_world(config, NUM_SCENES, seed=0)


def chance(world) -> float:
    return 5 / len(world.eval)


def test_a_short_run_retrieves_held_out_prompts_at_three_times_chance(config, world):
    metrics = score(config, world, train_in_process(config, world.train, STEPS))
    assert metrics["centred_recall@5"] >= 3 * chance(world), metrics
    assert metrics["prompt_cosine_mean"] > 0.2, metrics


def test_the_same_run_with_captions_shuffled_across_images_stays_near_chance(config, world):
    shuffled = world.train.shuffled_captions(seed=0)
    metrics = score(config, world, train_in_process(config, shuffled, STEPS))
    assert metrics["centred_recall@5"] < 2 * chance(world), metrics
    assert abs(metrics["prompt_cosine_mean"]) < 0.1, metrics
