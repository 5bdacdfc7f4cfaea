"""ray_jobs/train.py on Ray Train + DeepSpeed: multi-worker ZeRO runs, S3 checkpoints, resume, fault recovery."""

import json
import logging
import secrets
import shutil

import boto3
import pytest
import torch
from ray.data.dataset import MaterializedDataset
from safetensors.torch import load_file

from gap3d.build import build_aligner
from gap3d.export import load_export
from gap3d.features.format import MANIFEST_NAME
from gap3d.features.store import feature_files, load_rows
from gap3d.prompt_encoder import PromptEncoder
from gap3d.storage import filesystem
from gap3d.training import AlignerTrainModule, LRContinuation, lr_multiplier
from miniature.shards import write_synth
from ray_jobs.evaluate import evaluate
from ray_jobs.preprocess import run_preprocess
from ray_jobs.train import build_dataset, main, result_summary, run_training, trained_checkpoint
from tests.support import (
    KillTrainWorkerInSave,
    KillTrainWorkerWhen,
    checkpoint_complete,
    small_config,
    small_job,
    synthetic_features,
    upload_features,
)

NUM_SCENES = 400
STEPS = 120
ZERO2_STEPS = 60


@pytest.fixture(scope="module")
def bucket(s3_server):
    # A fresh name per session: gap3d.storage.local_dir caches downloads by URI, so a reused URI would read old files.
    name = f"gap3d-train-job-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_features(bucket):
    train, held_out = synthetic_features(small_config(), NUM_SCENES)
    return upload_features(train, f"{bucket}/features/train"), upload_features(held_out, f"{bucket}/features/eval")


def zero1_job(*overrides):
    return small_job(
        "scaling.zero_stage=1",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=30",
        "train.eval_every=60",
        "train.ema_decay=0.9",
        "train.lr=2e-3",
        *overrides,
    )


@pytest.fixture(scope="module")
def zero1_run(ray_cluster, bucket, s3_features):
    """Two DeepSpeed ZeRO-1 workers, features and checkpoints on S3 (moto); a worker process is killed once
    checkpoint 30 is in storage, and the group restarts from the newest checkpoint."""
    train, held_out = s3_features
    config, sections = zero1_job()
    with KillTrainWorkerWhen(checkpoint_complete(f"{bucket}/runs/zero1", 30)) as killer:
        result = run_training(
            config,
            sections["scaling"],
            f"{bucket}/runs",
            features=train,
            eval_features=held_out,
            name="zero1",
            max_failures=1,
        )
    assert killer.killed is not None, "no training worker was killed"
    return result


def zero2_job(max_steps, *overrides):
    return small_job(
        "scaling.zero_stage=2",
        f"train.max_steps={max_steps}",
        "train.checkpoint_every=10",
        "train.keep_checkpoints=2",
        *overrides,
    )


@pytest.fixture(scope="module")
def many_file_features():
    """Training features in many small Parquet files, so that read order and the split between ranks matter."""
    train = synthetic_features(small_config(), NUM_SCENES, rows_per_shard=24)[0]
    assert len(feature_files(str(train))) >= 8
    return train


@pytest.fixture(scope="module")
def straight_and_killed_runs(ray_cluster, many_file_features, tmp_path_factory):
    """The same ZeRO-2 run twice: straight through, and with a worker killed while the ranks save checkpoint 20."""
    storage = tmp_path_factory.mktemp("zero2")
    config, sections = zero2_job(ZERO2_STEPS)
    straight = run_training(
        config, sections["scaling"], str(storage), features=str(many_file_features), name="straight"
    )
    with KillTrainWorkerInSave(20) as killer:
        killed = run_training(
            config, sections["scaling"], str(storage), features=str(many_file_features), name="killed", max_failures=1
        )
    assert killer.killed is not None, "no training worker was killed"
    return storage, straight, killed


def untrained_loss(config, features: str) -> float:
    batch = load_rows(features, config, limit=64)[0]
    module = AlignerTrainModule(
        build_aligner(config, seed=config.train.seed), config.flow, PromptEncoder.from_pretrained(config.vlm)
    )
    with torch.no_grad():
        return module(batch, torch.Generator().manual_seed(0))["loss"].item()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_one_worker_with_activation_checkpointing_exports_whole_trained_weights(ray_cluster, tmp_path, zero_stage):
    config, sections = small_job(
        f"scaling.zero_stage={zero_stage}",
        "train.max_steps=4",
        "scaling.gradient_checkpointing=true",
        "scaling.num_workers=1",
    )
    train, _ = synthetic_features(config, NUM_SCENES)
    result = run_training(config, sections["scaling"], str(tmp_path), features=str(train), name=f"zero{zero_stage}")
    assert result.metrics["step"] == 4 and result.metrics["grad_norm"] > 0
    export = load_export(trained_checkpoint(result, str(tmp_path)))
    assert export.step == 4
    # The output layer starts at zero, so non-zero exported weights are trained ones, gathered whole under ZeRO-3.
    assert export.aligner.final_layer.linear.weight.abs().sum() > 0


def test_two_zero1_workers_lower_the_loss(zero1_run, s3_features):
    config, _ = zero1_job()
    assert zero1_run.metrics["step"] == STEPS
    assert zero1_run.metrics["loss"] < 0.75 * untrained_loss(config, s3_features[0])


def test_trained_aligner_beats_an_untrained_one_on_held_out_pairs(zero1_run, bucket, s3_features):
    report = evaluate(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}", s3_features[1])
    assert report["step"] == STEPS and report["samples"] > 20
    assert report["untrained"]["cosine_mean"] < 0.05
    assert report["trained"]["cosine_mean"] > report["untrained"]["cosine_mean"] + 0.15
    # Training's own periodic evaluation saw the same improvement.
    assert zero1_run.metrics["eval_cosine_mean"] > 0.15


def test_printed_checkpoint_keeps_the_s3_scheme_and_evaluates_like_its_run_directory(zero1_run, bucket, s3_features):
    printed = result_summary(zero1_run, f"{bucket}/runs")["checkpoint"]
    assert printed == f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}"
    from_checkpoint, from_run = (evaluate(uri, s3_features[1], limit=16) for uri in (printed, f"{bucket}/runs/zero1"))
    assert from_run["checkpoint"] == printed
    assert {k: v for k, v in from_run.items() if k != "seconds"} == {
        k: v for k, v in from_checkpoint.items() if k != "seconds"
    }


def test_evaluation_reports_tables_1_and_2_in_the_papers_form(zero1_run, bucket, s3_features):
    report = evaluate(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}", s3_features[1])
    trained = report["paper_tables"]["trained"]
    assert set(trained["alignment"]) == {"patches", "cls", "registers"}
    assert set(trained["alignment"]["cls"]) == {
        f"{m}_{s}" for m in ("cosine", "mse", "norm_ratio") for s in ("mean", "std")
    }
    assert set(trained["retrieval"]) == {"pooled", "summary"}
    chance = 100 * 10 / report["samples"]  # recall@10 of a prompt-blind query, in percent
    assert report["paper_tables"]["mean_target"]["retrieval"]["pooled"]["R@10"] == pytest.approx(chance)


def test_evaluation_scores_the_held_out_mean_as_a_prompt_blind_reference(zero1_run, bucket, s3_features):
    report = evaluate(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}", s3_features[1])
    targets = load_rows(s3_features[1], zero1_job()[0], limit=report["samples"])[0].dino
    expected = torch.nn.functional.cosine_similarity(targets, targets.mean(0, keepdim=True), dim=-1).mean().item()
    assert report["mean_target"]["cosine_mean"] == pytest.approx(expected, rel=1e-5)


def test_checkpoint_holds_every_ranks_deepspeed_state_ema_export_and_config(zero1_run, bucket):
    fs, root = filesystem(f"{bucket}/runs/zero1/checkpoint_{STEPS:08d}")
    names = {path[len(root) + 1 :] for path in fs.find(root)}
    assert {
        "deepspeed/mp_rank_00_model_states.pt",
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "ema.safetensors",
        "export/model.safetensors",
        "export/config.yaml",
        "export/export.json",
        "config.yaml",
        "progress.json",
    } <= names


def test_zero1_workers_restart_after_a_worker_is_killed_and_reach_the_requested_step(zero1_run):
    # The group restarted from a checkpoint written before the kill (30, or a later one it reached first).
    assert zero1_run.metrics["resumed_from_step"] in range(30, STEPS, 30)
    assert zero1_run.metrics["step"] == STEPS


def test_a_run_killed_and_resumed_ends_with_the_weights_of_a_straight_run(straight_and_killed_runs):
    storage, straight, killed = straight_and_killed_runs
    assert killed.metrics["resumed_from_step"] in range(10, ZERO2_STEPS, 10)
    assert killed.metrics["step"] == straight.metrics["step"] == ZERO2_STEPS
    assert killed.metrics["loss"] == straight.metrics["loss"]
    last = f"checkpoint_{ZERO2_STEPS:08d}"
    ema = {name: load_file(storage / name / last / "ema.safetensors") for name in ("straight", "killed")}
    assert ema["killed"].keys() == ema["straight"].keys()
    for key in ema["straight"]:
        torch.testing.assert_close(ema["killed"][key], ema["straight"][key], rtol=0, atol=0, msg=key)


def test_rerun_with_more_steps_and_a_new_lr_continues_from_its_last_checkpoint_on_the_continued_schedule(
    ray_cluster, straight_and_killed_runs, many_file_features
):
    storage, _, _ = straight_and_killed_runs
    saved = zero2_job(ZERO2_STEPS)[0].train
    config, sections = zero2_job(ZERO2_STEPS + 20, f"train.lr={saved.lr / 2}")
    rerun = run_training(config, sections["scaling"], str(storage), features=str(many_file_features), name="straight")
    assert (rerun.metrics["resumed_from_step"], rerun.metrics["step"]) == (ZERO2_STEPS, ZERO2_STEPS + 20)
    # The LR halves at the checkpoint, then decays by cosine to train.min_lr at the new end (ray_jobs/resume.py).
    continuation = LRContinuation(ZERO2_STEPS, lr_multiplier(ZERO2_STEPS, saved))
    progress = json.loads((storage / "straight" / f"checkpoint_{ZERO2_STEPS + 10:08d}" / "progress.json").read_text())
    assert progress["metrics"]["lr"] == pytest.approx(
        config.train.lr * lr_multiplier(ZERO2_STEPS + 10, config.train, continuation)
    )
    assert progress["lr_continuation"] == {"start_step": ZERO2_STEPS, "start_multiplier": continuation.start_multiplier}


def test_rerun_with_another_zero_stage_fails_on_the_driver_naming_the_key(straight_and_killed_runs, many_file_features):
    storage, _, _ = straight_and_killed_runs
    config, sections = zero2_job(ZERO2_STEPS + 20, "scaling.zero_stage=1")
    with pytest.raises(ValueError, match="changed scaling.zero_stage: 2 -> 1"):
        run_training(config, sections["scaling"], str(storage), features=str(many_file_features), name="killed")


def test_only_the_newest_checkpoints_are_kept(straight_and_killed_runs):
    storage, _, _ = straight_and_killed_runs
    kept = sorted(path.name for path in (storage / "killed").glob("checkpoint_0*"))
    assert kept == [f"checkpoint_{ZERO2_STEPS - 10:08d}", f"checkpoint_{ZERO2_STEPS:08d}"]


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


TRUNCATED = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def rerun_past_bad_checkpoints(ray_cluster, straight_and_killed_runs, many_file_features):
    """A copy of the killed run whose newest checkpoint has a truncated rank-1 optimiser file, beside a newer one
    that a save cut short left (its files, no record), rerun to the same step with no restarts allowed."""
    storage, _, _ = straight_and_killed_runs
    run = storage / "bad"
    shutil.copytree(storage / "killed", run)
    last, cut_short = (run / f"checkpoint_{step:08d}" for step in (ZERO2_STEPS, ZERO2_STEPS + 10))
    shutil.copytree(last, cut_short)
    (cut_short / "complete.json").unlink()
    with open(last / TRUNCATED, "r+b") as handle:
        handle.truncate(1000)
    messages = _Messages()
    logging.getLogger("gap3d.train").addHandler(messages)
    try:
        config, sections = zero2_job(ZERO2_STEPS)
        result = run_training(config, sections["scaling"], str(storage), features=str(many_file_features), name="bad")
    finally:
        logging.getLogger("gap3d.train").removeHandler(messages)
    return run, result, "\n".join(messages.lines)


def test_a_rerun_past_bad_checkpoints_resumes_the_newest_good_one_and_ends_as_the_straight_run(
    rerun_past_bad_checkpoints, straight_and_killed_runs
):
    run, result, _ = rerun_past_bad_checkpoints
    storage, straight, _ = straight_and_killed_runs
    assert (result.metrics["resumed_from_step"], result.metrics["step"]) == (ZERO2_STEPS - 10, ZERO2_STEPS)
    assert result.metrics["loss"] == straight.metrics["loss"]
    last = f"checkpoint_{ZERO2_STEPS:08d}/ema.safetensors"  # the killed run's equals the straight run's (tested above)
    rerun, reference = load_file(run / last), load_file(storage / "killed" / last)
    for key in reference:
        torch.testing.assert_close(rerun[key], reference[key], rtol=0, atol=0, msg=key)


def test_a_rerun_logs_each_checkpoint_it_skips_naming_the_bad_file(rerun_past_bad_checkpoints):
    run, _, messages = rerun_past_bad_checkpoints
    assert f"{run / f'checkpoint_{ZERO2_STEPS + 10:08d}'} has no complete.json: its save never finished" in messages
    assert f"{run / f'checkpoint_{ZERO2_STEPS:08d}' / TRUNCATED} has 1000 bytes" in messages


def test_skipped_checkpoints_are_moved_out_of_the_run_with_their_reasons(rerun_past_bad_checkpoints):
    run, _, _ = rerun_past_bad_checkpoints
    assert sorted(path.name for path in run.glob("checkpoint_0*")) == [
        f"checkpoint_{ZERO2_STEPS - 10:08d}",
        f"checkpoint_{ZERO2_STEPS:08d}",
    ]
    reasons = sorted(path.read_text() for path in run.glob("invalid/*/INVALID.txt"))
    assert len(reasons) == 2 and "has 1000 bytes" in reasons[0] and "has no complete.json" in reasons[1]


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    write_synth(str(raw), 96, seed=11, shard_size=24, image_size=112)
    return raw


def test_training_reads_one_split_of_the_preprocessing_jobs_output(ray_cluster, raw_shards, tmp_path):
    config, sections = small_job("train.max_steps=3", "scaling.zero_stage=1", "scaling.num_workers=1")
    run_preprocess(config, sections["encode"], str(raw_shards), str(tmp_path / "features"))
    assert {p.name.split("-")[0] for p in (tmp_path / "features").glob("*.parquet")} == {"train", "eval"}
    train = str(tmp_path / "features" / "train-*.parquet")
    assert all("/train-" in path for path in feature_files(train))
    result = run_training(
        config,
        sections["scaling"],
        str(tmp_path / "runs"),
        features=train,
        eval_features=str(tmp_path / "features" / "eval-*.parquet"),
    )
    assert result.metrics["step"] == 3
    # The periodic evaluation scored the held-out split exactly as the evaluation job scores the exported weights.
    report = evaluate(
        trained_checkpoint(result, str(tmp_path / "runs")),
        str(tmp_path / "features" / "eval-*.parquet"),
        limit=config.train.eval_samples,
    )
    for metric in ("cosine_mean", "mse_mean", "recall@5"):
        assert result.metrics[f"eval_{metric}"] == pytest.approx(report["trained"][metric], rel=1e-4), metric


def test_stream_mode_trains_on_raw_shards_encoded_on_the_fly(ray_cluster, raw_shards, tmp_path):
    config, sections = small_job(
        "train.max_steps=3", "scaling.zero_stage=1", "train.log_every=1", "scaling.num_workers=1"
    )
    result = run_training(
        config, sections["scaling"], str(tmp_path / "runs"), stream=str(raw_shards), encode=sections["encode"]
    )
    # Streamed rows are the preprocessing job's rows: 3 steps of 16 samples came out of the 96 raw ones.
    assert result.metrics["step"] == 3 and result.metrics["samples"] == 3 * config.train.global_batch_size


def test_stream_mode_skips_corrupt_shards_instead_of_failing(ray_cluster, raw_shards, tmp_path):
    shutil.copytree(raw_shards, tmp_path / "raw")
    cut = min((tmp_path / "raw").glob("*.tar"))
    cut.write_bytes(cut.read_bytes()[:3000])
    (tmp_path / "raw" / "garbage.parquet").write_bytes(b"not a parquet file")
    config, sections = small_job(
        "train.max_steps=3", "scaling.zero_stage=1", "train.log_every=1", "scaling.num_workers=1"
    )
    result = run_training(
        config, sections["scaling"], str(tmp_path / "runs"), stream=str(tmp_path / "raw"), encode=sections["encode"]
    )
    assert result.metrics["step"] == 3


@pytest.mark.parametrize("materialize", [True, False])
def test_feature_rows_stay_in_the_object_store_across_epochs_only_when_configured(ray_cluster, materialize):
    config, sections = small_job(f"scaling.materialize_features={str(materialize).lower()}")
    train, _ = synthetic_features(config, NUM_SCENES)
    dataset = build_dataset(sections["scaling"], str(train))
    assert isinstance(dataset, MaterializedDataset) == materialize
    assert dataset.count() == len(load_rows(str(train), config)[1])


def test_missing_features_fail_at_start_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no feature manifest at {tmp_path / 'none'}"):
        main(["--features", str(tmp_path / "none"), "--storage", str(tmp_path)])


def test_a_truncated_feature_file_fails_at_start_naming_it(tmp_path):
    train, _ = synthetic_features(small_config(), NUM_SCENES)
    shutil.copytree(train, tmp_path / "features")
    truncated = max((tmp_path / "features").glob("*.parquet"))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"feature file {truncated} has 5000 bytes, its shard record"):
        main(["--features", str(tmp_path / "features"), "--storage", str(tmp_path / "runs")])


def test_features_from_another_encoder_fail_at_start(tmp_path):
    train, _ = synthetic_features(small_config(), NUM_SCENES)
    other, sections = small_job("vlm.prompt_template=Draw {caption}")
    with pytest.raises(ValueError, match="prompt_template: features have"):
        run_training(other, sections["scaling"], str(tmp_path), features=str(train))


def test_a_batch_not_divisible_by_the_workers_fails_at_start(tmp_path):
    with pytest.raises(
        ValueError, match="global_batch_size 15 is not divisible by scaling.num_workers x train.grad_accum_steps = 2"
    ):
        main(["--features", str(tmp_path), "--storage", str(tmp_path), "train.global_batch_size=15"])


def test_features_smaller_than_one_global_batch_fail_at_start(tmp_path):
    train, _ = synthetic_features(small_config(), NUM_SCENES)
    manifest = json.loads((train / MANIFEST_NAME).read_text())
    config, sections = small_job("train.global_batch_size=1024")
    assert sum(shard["rows"] for shard in manifest["shards"].values()) < 1024
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run_training(config, sections["scaling"], str(tmp_path), features=str(train))
