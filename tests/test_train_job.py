"""ray_jobs/train.py on Ray Train + DeepSpeed: multi-worker ZeRO runs, S3 checkpoints, resume, fault recovery."""

import json
import secrets

import boto3
import pytest
import torch
from ray.data.dataset import MaterializedDataset

from gap3d.build import build_aligner
from gap3d.data.synth import write_synth
from gap3d.export import load_export
from gap3d.features import MANIFEST_NAME
from gap3d.prompt_encoder import PromptEncoder
from gap3d.storage import filesystem
from gap3d.training import AlignerTrainModule, optimizer_state_digest
from gap3d.training_data import feature_files, load_rows
from ray_jobs.evaluate import evaluate
from ray_jobs.preprocess import run_preprocess
from ray_jobs.train import FAULT_MARKER, build_dataset, main, run_training
from tests.test_training_support import small_config, synthetic_features, upload_features

NUM_SCENES = 400
STEPS = 120


@pytest.fixture(scope="module")
def bucket(s3_server):
    # A fresh name per session: gap3d.storage.local_dir caches downloads by URI, so a reused URI would read old files.
    name = f"gap3d-train-job-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_features(tiny_checkpoints, bucket):
    train, held_out = synthetic_features(small_config(tiny_checkpoints), NUM_SCENES)
    return upload_features(train, f"{bucket}/features/train"), upload_features(held_out, f"{bucket}/features/eval")


def zero1_config(tiny_checkpoints, *overrides):
    return small_config(
        tiny_checkpoints, "train.zero_stage=1", f"train.max_steps={STEPS}", "train.checkpoint_every=60", "train.eval_every=60",
        "train.ema_decay=0.9", "train.lr=2e-3", *overrides,
    )


@pytest.fixture(scope="module")
def zero1_run(ray_cluster, tiny_checkpoints, bucket, s3_features):
    """Two DeepSpeed ZeRO-1 workers, features and checkpoints on S3 (moto); rank 0 crashes once at step 70."""
    train, held_out = s3_features
    config = zero1_config(tiny_checkpoints)
    return run_training(config, f"{bucket}/runs", features=train, eval_features=held_out, name="zero1", max_failures=1, fail_once_at_step=70)


def zero2_config(tiny_checkpoints, max_steps):
    return small_config(tiny_checkpoints, "train.zero_stage=2", f"train.max_steps={max_steps}", "train.checkpoint_every=10", "train.keep_checkpoints=2")


@pytest.fixture(scope="module")
def resumed_run(ray_cluster, tiny_checkpoints, tmp_path_factory):
    """A ZeRO-2 run to step 20, then the same command rerun with train.max_steps=30: (storage, rerun result)."""
    storage = tmp_path_factory.mktemp("zero2")
    config = zero2_config(tiny_checkpoints, 20)
    train, _ = synthetic_features(config, NUM_SCENES)
    first = run_training(config, str(storage), features=str(train), name="zero2")
    assert first.metrics["step"] == 20 and first.metrics["resumed_from_step"] == 0
    return storage, run_training(zero2_config(tiny_checkpoints, 30), str(storage), features=str(train), name="zero2")


def untrained_loss(config, features: str) -> float:
    batch = load_rows(features, config, limit=64)[0]
    module = AlignerTrainModule(build_aligner(config, seed=config.train.seed), config.flow, PromptEncoder.from_pretrained(config.vlm))
    with torch.no_grad():
        return module(batch, torch.Generator().manual_seed(0))["loss"].item()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_in_process_run_with_activation_checkpointing_exports_whole_trained_weights(ray_cluster, tiny_checkpoints, tmp_path, zero_stage):
    config = small_config(tiny_checkpoints, f"train.zero_stage={zero_stage}", "train.max_steps=4", "train.gradient_checkpointing=true")
    train, _ = synthetic_features(config, NUM_SCENES)
    result = run_training(config, str(tmp_path), features=str(train), in_process=True, name=f"zero{zero_stage}")
    assert result.metrics["step"] == 4 and result.metrics["grad_norm"] > 0
    with result.checkpoint.as_directory() as directory:
        export = load_export(f"{directory}/export")
    assert export.step == 4
    # The output layer starts at zero, so non-zero exported weights are trained ones, gathered whole under ZeRO-3.
    assert export.aligner.final_layer.linear.weight.abs().sum() > 0


def test_two_zero1_workers_lower_the_loss(zero1_run, tiny_checkpoints, s3_features):
    config = zero1_config(tiny_checkpoints)
    assert zero1_run.metrics["step"] == STEPS
    assert zero1_run.metrics["loss"] < 0.75 * untrained_loss(config, s3_features[0])


def test_trained_aligner_beats_an_untrained_one_on_held_out_pairs(zero1_run, bucket, s3_features):
    report = evaluate(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}", s3_features[1])
    assert report["step"] == STEPS and report["samples"] > 20
    assert report["untrained"]["cosine_mean"] < 0.05
    assert report["trained"]["cosine_mean"] > report["untrained"]["cosine_mean"] + 0.15
    # Training's own periodic evaluation saw the same improvement.
    assert zero1_run.metrics["eval_cosine_mean"] > 0.15


def test_evaluation_scores_the_held_out_mean_as_a_prompt_blind_reference(zero1_run, tiny_checkpoints, bucket, s3_features):
    report = evaluate(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}", s3_features[1])
    targets = load_rows(s3_features[1], zero1_config(tiny_checkpoints), limit=report["samples"])[0].dino
    expected = torch.nn.functional.cosine_similarity(targets, targets.mean(0, keepdim=True), dim=-1).mean().item()
    assert report["mean_target"]["cosine_mean"] == pytest.approx(expected, rel=1e-5)


def test_checkpoint_holds_every_ranks_deepspeed_state_ema_export_and_config(zero1_run, bucket):
    fs, root = filesystem(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}")
    names = {path[len(root) + 1 :] for path in fs.find(root)}
    assert {"deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt", "rng_rank1.pt", "ema.safetensors",
            "export/model.safetensors", "export/config.yaml", "export/export.json", "config.yaml", "progress.json"} <= names


def test_zero1_workers_restart_after_a_crash_and_reach_the_requested_step(zero1_run, bucket):
    fs, root = filesystem(f"{bucket}/runs/zero1/{FAULT_MARKER}")
    assert fs.exists(root)
    assert zero1_run.metrics["resumed_from_step"] == 60
    assert zero1_run.metrics["step"] == STEPS


def test_rerun_resumes_from_the_saved_step_with_identical_optimizer_state(resumed_run):
    storage, rerun = resumed_run
    assert rerun.metrics["resumed_from_step"] == 20
    assert rerun.metrics["step"] == 30
    saved = torch.load(storage / "zero2" / "checkpoint_00000020" / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert rerun.metrics["resume_optimizer_digest"] == pytest.approx(optimizer_state_digest(saved["optimizer_state_dict"]), rel=1e-12)


def test_only_the_newest_checkpoints_are_kept(resumed_run):
    storage, _ = resumed_run
    kept = sorted(path.name for path in (storage / "zero2").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000020", "checkpoint_00000030"]


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    write_synth(str(raw), 96, seed=11, shard_size=24, image_size=112)
    return raw


def test_training_reads_one_split_of_the_preprocessing_jobs_output(ray_cluster, tiny_checkpoints, raw_shards, tmp_path):
    config = small_config(tiny_checkpoints, "train.max_steps=3", "train.zero_stage=1")
    run_preprocess(config, str(raw_shards), str(tmp_path / "features"))
    assert {p.name.split("-")[0] for p in (tmp_path / "features").glob("*.parquet")} == {"train", "eval"}
    train = str(tmp_path / "features" / "train-*.parquet")
    assert all("/train-" in path for path in feature_files(train))
    result = run_training(config, str(tmp_path / "runs"), features=train, eval_features=str(tmp_path / "features" / "eval-*.parquet"), in_process=True)
    assert result.metrics["step"] == 3 and 0.0 <= result.metrics["eval_recall@10"] <= 1.0


def test_stream_mode_trains_on_raw_shards_encoded_on_the_fly(ray_cluster, tiny_checkpoints, raw_shards, tmp_path):
    config = small_config(tiny_checkpoints, "train.max_steps=3", "train.zero_stage=1")
    result = run_training(config, str(tmp_path / "runs"), stream=str(raw_shards), in_process=True)
    assert result.metrics["step"] == 3 and result.metrics["loss"] > 0


@pytest.mark.parametrize("materialize", [True, False])
def test_feature_rows_stay_in_the_object_store_across_epochs_only_when_configured(ray_cluster, tiny_checkpoints, materialize):
    config = small_config(tiny_checkpoints, f"train.materialize_features={str(materialize).lower()}")
    train, _ = synthetic_features(config, NUM_SCENES)
    dataset = build_dataset(config, str(train), None)
    assert isinstance(dataset, MaterializedDataset) == materialize
    assert dataset.count() == len(load_rows(str(train), config)[1])


def test_missing_features_fail_at_start_naming_the_path(tiny_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no feature manifest at {tmp_path / 'none'}"):
        main(["--features", str(tmp_path / "none"), "--storage", str(tmp_path), f"vlm.path={tiny_checkpoints['vlm']}", f"dino.path={tiny_checkpoints['dino']}"])


def test_features_from_another_encoder_fail_at_start(tiny_checkpoints, tmp_path):
    train, _ = synthetic_features(small_config(tiny_checkpoints), NUM_SCENES)
    other = small_config(tiny_checkpoints, "vlm.prompt_template=Draw {caption}")
    with pytest.raises(ValueError, match="prompt_template: features have"):
        run_training(other, str(tmp_path), features=str(train))


def test_a_batch_not_divisible_by_the_workers_fails_at_start(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="global_batch_size 15 is not divisible by train.num_workers x train.grad_accum_steps = 2"):
        main(["--features", str(tmp_path), "--storage", str(tmp_path), "train.global_batch_size=15"])


def test_features_smaller_than_one_global_batch_fail_at_start(tiny_checkpoints, tmp_path):
    train, _ = synthetic_features(small_config(tiny_checkpoints), NUM_SCENES)
    manifest = json.loads((train / MANIFEST_NAME).read_text())
    config = small_config(tiny_checkpoints, "train.global_batch_size=1024")
    assert sum(shard["rows"] for shard in manifest["shards"].values()) < 1024
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run_training(config, str(tmp_path), features=str(train))
