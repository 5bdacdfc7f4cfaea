"""miniature.experiment: the synthetic world in memory, its shuffled control and the caption ceiling."""

import pytest
import torch

from miniature.experiment import caption_ceiling, encode_world, oracle_condition
from miniature.world import HELD_OUT
from tests.support import small_config


@pytest.fixture(scope="module")
def config():
    return small_config()


@pytest.fixture(scope="module")
def world(config):
    return encode_world(config, 60, seed=0)


def test_world_splits_by_held_out_pairs(world):
    pairs = lambda split: set(zip(split.labels["shape"], split.labels["color"]))
    assert pairs(world.eval) <= HELD_OUT and not pairs(world.train) & HELD_OUT
    assert len(world.train.batch.dino) == len(world.train.captions) == len(world.train.batch.caches)


def test_shuffled_captions_keep_the_images_and_move_captions_with_their_prompt_caches(world):
    shuffled = world.train.shuffled_captions(seed=0)
    assert torch.equal(shuffled.batch.dino, world.train.batch.dino)
    assert sorted(shuffled.captions) == sorted(world.train.captions) and shuffled.captions != world.train.captions
    row_of = {id(cache): row for row, cache in enumerate(world.train.batch.caches)}
    assert all(
        world.train.captions[row_of[id(cache)]] == caption
        for caption, cache in zip(shuffled.captions, shuffled.batch.caches)
    )


def test_oracle_condition_is_the_attributes_one_hot(config):
    cond = oracle_condition({"shape": ["cube", "torus"], "color": ["red", "red"]}, config)
    assert cond.shape == (2, config.vlm.num_soft_tokens, config.aligner.cond_dim)
    assert cond[0, 0, :12].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert cond[1, 0, 3] == 1 and torch.equal(cond[:, 0], cond[:, -1])


def test_caption_ceiling_knows_every_attribute_but_not_the_pose(world):
    ceiling = caption_ceiling(world)
    assert ceiling["shape_accuracy"] > 0.9 and ceiling["prompt_cosine_mean"] > 0.5
    assert ceiling["centred_recall@1"] < 1.0  # rows of one pair differ in yaw and light, which no caption says
