"""Table 3 in the miniature, as a test that can fail (issue 32 item 6).

The aligner the learning test trains in process on the tiny world (the session's `short_run`), the shipped tiny
TRELLIS (tiny://trellis; stage 1, as the tiny table3 preset decodes), and the demo's held-out objects (shape x
colour pairs no training image showed) as the evaluation set: the 3D job's FD and KD on DINOv2 features must put the
reference (TRELLIS on the true tokens of each object's image) and GAP3D (tokens generated from the caption) far
below an untrained aligner, and FD the reference below GAP3D (with the earlier, weaker stage-1 release the two tied:
5.17 against 5.02). The CLIP score runs end to end on a tiny random CLIP (tiny://clip), and a TRELLIS-text arm on a
tiny random text release conditioned by that CLIP's text tower: both plumbing only, their figures mean nothing.
"""

import dataclasses
import json
import math
import shutil

import pytest

from cli.table3_miniature import run_miniature_table3
from gap3d.export import save_export
from gap3d.trellis.config import TEXT_PIPELINE
from miniature.checkpoints import tiny_checkpoint
from miniature.checkpoints.trellis import write_tiny_trellis
from ray_jobs.table3_stages import TABLE3_PRESETS

DEMO_SAMPLES = 1000  # the demo's world, whose held-out objects are evaluated
OBJECTS = 36  # 144 FD views per arm: FD on 64-d features of fewer is noisy
CLIP_WIDTH = 32  # tiny://clip's text width, the text release's condition width

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config(short_run):
    return short_run[0]


@pytest.fixture(scope="module")
def export(short_run, tmp_path_factory):
    config, _, trained = short_run
    soft_tokens = None if trained.prompt_encoder is None else trained.prompt_encoder.soft_tokens
    out = tmp_path_factory.mktemp("export")
    return str(save_export(out, trained.aligner.state_dict(), soft_tokens, config, config.train.max_steps))


@pytest.fixture(scope="module")
def text_release(tmp_path_factory):
    """A tiny random TRELLIS-text release whose text encoder is tiny://clip's text tower."""
    root = write_tiny_trellis(tmp_path_factory.mktemp("trellis-text") / "release", cond_dim=CLIP_WIDTH, stage2=False)
    spec = json.loads((root / "pipeline.json").read_text())
    spec["name"] = TEXT_PIPELINE
    spec["args"]["text_cond_model"] = "tiny://clip"
    (root / "pipeline.json").write_text(json.dumps(spec))
    return str(root)


@pytest.fixture(scope="module")
def report(ray_cluster, config, export, text_release, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("table3")
    settings = dataclasses.replace(TABLE3_PRESETS["tiny"], trellis_text=text_release, sheet_rows=4, supersample=1)
    trellis = shutil.copytree(tiny_checkpoint("trellis"), workdir / "trellis")
    return run_miniature_table3(
        workdir, export, str(trellis), config, seed=0, num_samples=DEMO_SAMPLES, limit=OBJECTS, settings=settings
    )


def test_fd_on_dinov2_features_ranks_gap3d_and_the_reference_far_below_an_untrained_aligner(report):
    fd = {arm: scores["fd_dinov2"] for arm, scores in report["arms"].items()}
    assert max(fd["reference"], fd["gap3d"]) < fd["untrained"] / 3, report["arms"]


def test_kd_on_dinov2_features_ranks_gap3d_and_the_reference_far_below_an_untrained_aligner(report):
    kd = {arm: scores["kd_dinov2"] for arm, scores in report["arms"].items()}
    assert max(kd["reference"], kd["gap3d"]) < kd["untrained"] / 3, report["arms"]


@pytest.mark.xfail(
    strict=True,
    reason="with the reference conditioned as the tiny TRELLIS was trained (uncropped world images), both arms decode "
    "every shape and FD over 36 objects does not separate them (6.00 against 5.92); it ranked the reference first "
    "only while a crop the decoder never saw turned its spheres into tori and cubes, which FD, a distribution "
    "metric, did not see (docs/evaluation_3d.md)",
)
def test_fd_on_dinov2_features_ranks_the_reference_below_gap3d(report):
    fd = {arm: scores["fd_dinov2"] for arm, scores in report["arms"].items()}
    assert fd["reference"] < fd["gap3d"], report["arms"]


def test_the_reference_arm_is_conditioned_on_tokens_that_decode_each_objects_own_shape(report):
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from gap3d.data.occupancy import downsample
    from gap3d.evalset import read_manifest, row_targets
    from gap3d.trellis.decoder import Decoder
    from gap3d.trellis.structure_metrics import nearest_labels
    from miniature.world import sample_scene, scene_occupancy

    eval_set = report["eval_set"]
    rows = [
        row for shard in read_manifest(eval_set)["shards"] for row in pq.read_table(f"{eval_set}/{shard}").to_pylist()
    ]
    decoder = Decoder.from_pretrained(str(tiny_checkpoint("trellis")), device="cpu", stages="coarse")
    tokens = torch.from_numpy(np.stack([row_targets(row) for row in rows]))
    decoded = decoder.sample_sparse_structure(tokens, seed=[row["index"] for row in rows]).occupancy
    scenes = [sample_scene(0, int(row["key"].split(".")[0])) for row in rows]
    truth = torch.from_numpy(np.stack([downsample(scene_occupancy(s), decoder.structure_resolution) for s in scenes]))
    named = nearest_labels(decoded, truth, [scene.shape for scene in scenes])
    for shape in sorted({scene.shape for scene in scenes}):
        rows_of_shape = [i for i, scene in enumerate(scenes) if scene.shape == shape]
        assert np.mean([named[i] == shape for i in rows_of_shape]) >= 0.9, (shape, [named[i] for i in rows_of_shape])


def test_every_arm_scores_every_object(report):
    assert report["assets"] == OBJECTS
    assert set(report["arms"]) == {"reference", "gap3d", "untrained", "trellis_text"}


def test_the_clip_score_runs_end_to_end_on_a_tiny_random_clip(report):
    scores = [scores["clip_score"] for scores in report["arms"].values()] + [report["ground_truth"]["clip_score"]]
    assert all(math.isfinite(score) and abs(score) <= 100 for score in scores)
    assert report["extractors"]["clip"] == "tiny://clip"


def test_the_report_and_contact_sheet_are_written(report):
    from PIL import Image

    written = json.loads(open(report["contact_sheet"].replace("contact_sheet.png", "table3.json")).read())
    assert written["arms"] == report["arms"]
    assert Image.open(report["contact_sheet"]).size[1] > 4 * 100  # a header and 4 rows of thumbnails
    assert "Gaussians" in report["notes"]["renders"]


def test_the_paper_section_names_the_papers_extractors_and_arms():
    from gap3d.config import load_job_config
    from ray_jobs.table3_stages import TABLE3_SECTION

    settings = load_job_config("paper", sections=TABLE3_SECTION)[1]["table3"]
    assert (settings.inception, settings.dino, settings.dino_image_size, settings.clip) == (
        "timm/inception_v3.tv_in1k",
        "facebook/dinov2-large",
        518,
        "openai/clip-vit-base-patch32",
    )
    assert settings.arms() == ["reference", "gap3d"]
    with_text = load_job_config("paper", overrides=["table3.trellis_text=org/text"], sections=TABLE3_SECTION)[1]
    assert with_text["table3"].arms() == ["reference", "gap3d", "trellis_text"]


def test_a_table3_value_out_of_range_fails_naming_the_key():
    from gap3d.config import load_job_config
    from ray_jobs.table3_stages import TABLE3_SECTION

    with pytest.raises(ValueError, match="table3.actors must be >= 1"):
        load_job_config("tiny", overrides=["table3.actors=0"], sections=TABLE3_SECTION)


def test_an_unknown_decoder_stage_fails_naming_the_choices():
    from gap3d.config import load_job_config
    from ray_jobs.table3_stages import TABLE3_SECTION

    with pytest.raises(ValueError, match="table3.decoder_stages must be auto, coarse or full"):
        load_job_config("tiny", overrides=["table3.decoder_stages=fine"], sections=TABLE3_SECTION)
