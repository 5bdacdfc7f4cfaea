"""ray_jobs/train_decoder.py: stage-1 training under Ray Train, checkpointed like the aligner, exported as a TRELLIS
release."""

import json

import pytest
import torch
import yaml

from gap3d.data.occupancy import downsample, encode_occupancy
from gap3d.trellis.decoder import Decoder
from gap3d.trellis.stage1_training import Stage1Config, Stage1Trainer
from miniature.shards import ShardWriter
from miniature.world import sample_scene, scene_occupancy
from ray_jobs.train_decoder import STATE_NAME, load_inputs, run_decoder_training
from tests.support import small_config, write_feature_dir

pytestmark = pytest.mark.slow

TOY = Stage1Config(
    resolution=8,
    vae_channels=[4, 8],
    flow_width=16,
    flow_blocks=1,
    flow_heads=2,
    vae_steps=3,
    flow_steps=3,
    vae_batch_size=2,
    flow_batch_size=2,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(config, features dir, shards dir) for 12 scenes; feature row j and occupancy key j are the same object."""
    root = tmp_path_factory.mktemp("decoder-inputs")
    config = small_config()
    scenes = [sample_scene(4, index) for index in range(12)]
    features = write_feature_dir(config, scenes, root / "features")
    writer = ShardWriter(str(root / "raw"), "train", shard_size=5)
    for index, scene in enumerate(scenes):
        writer.add(f"{index:08d}", {"occupancy.npy": encode_occupancy(scene_occupancy(scene))})
    writer.close()
    return config, str(features), str(root / "raw"), scenes


def test_inputs_join_each_feature_row_with_its_own_occupancy(inputs):
    config, features, shards, scenes = inputs
    occupancy, tokens = load_inputs(config, TOY, features, shards)
    assert tokens.shape[0] == occupancy.shape[0] == len(scenes)
    for row, scene in enumerate(scenes):
        torch.testing.assert_close(occupancy[row], torch.from_numpy(downsample(scene_occupancy(scene), 8)))


def test_rows_without_occupancy_fail_naming_the_shards(inputs, tmp_path):
    config, features, _, _ = inputs
    writer = ShardWriter(str(tmp_path), "train", 4)
    writer.add("00000000", {"txt": b"a red cube"})  # a sample without its occupancy
    writer.close()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_inputs(config, TOY, features, str(tmp_path))


def test_the_job_checkpoints_like_the_aligner_and_exports_the_in_process_result(inputs, tmp_path, ray_cluster):
    config, features, shards, _ = inputs
    result = run_decoder_training(
        config, TOY, features, shards, str(tmp_path), name="decoder", checkpoint_every=2, worker_cpus=0.5
    )
    checkpoint = result.checkpoint.path
    assert result.metrics["step"] == 6
    saved = yaml.safe_load(open(f"{checkpoint}/config.yaml"))
    assert saved["stage1"]["flow_steps"] == 3 and saved["preset"] == "tiny"
    decoder = Decoder.from_pretrained(f"{checkpoint}/release", device="cpu", stages="coarse")
    occupancy, tokens = load_inputs(config, TOY, features, shards)
    reference = Stage1Trainer(TOY, occupancy, tokens)
    reference.fit()
    for key, value in reference.flow_for_release().state_dict().items():
        torch.testing.assert_close(decoder.flow_model.state_dict()[key], value)
    state = torch.load(f"{checkpoint}/{STATE_NAME}", weights_only=False)
    # The worker runs one torch thread, this process more: reductions round differently, nothing else differs.
    assert [h["loss"] for h in state["history"]] == pytest.approx([h["loss"] for h in reference.history], rel=1e-5)


def test_rerunning_a_finished_run_resumes_at_its_last_step_without_training(inputs, tmp_path, ray_cluster):
    config, features, shards, _ = inputs
    first = run_decoder_training(
        config, TOY, features, shards, str(tmp_path), name="again", checkpoint_every=3, worker_cpus=0.5
    )
    second = run_decoder_training(
        config, TOY, features, shards, str(tmp_path), name="again", checkpoint_every=3, worker_cpus=0.5
    )
    assert second.checkpoint.path == first.checkpoint.path
    history = json.dumps(torch.load(f"{second.checkpoint.path}/{STATE_NAME}", weights_only=False)["history"])
    assert history == json.dumps(torch.load(f"{first.checkpoint.path}/{STATE_NAME}", weights_only=False)["history"])
