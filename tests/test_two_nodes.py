"""Training across two Ray nodes with S3 storage, and a node lost mid-run (driver: tests/two_nodes.py)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import small_config, synthetic_features, upload_features
from tests.two_nodes import KILL_AFTER, STEPS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_node_run(s3_server, tmp_path_factory):
    """The driver's JSON; its Ray temp directory is its own, so no other process on the machine joins its cluster."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="gap3d-two-nodes")
    train, _ = synthetic_features(small_config(), 400)
    features = upload_features(train, "s3://gap3d-two-nodes/features")
    out = tmp_path_factory.mktemp("two-nodes") / "result.json"
    ray_dir = tempfile.mkdtemp(prefix="/tmp/g2n-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_dir}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable,
        "-m",
        "tests.two_nodes",
        "--features",
        features,
        "--storage",
        "s3://gap3d-two-nodes/runs",
        "--local-storage",
        str(out.parent / "runs"),
        "--out",
        str(out),
    ]
    try:
        driver = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert driver.returncode == 0 and out.is_file(), driver.stderr[-5000:]
    return json.loads(out.read_text())


def test_local_storage_on_two_nodes_fails_at_start_naming_it(two_node_run):
    assert "is a local path, but the Ray cluster has 2 nodes" in two_node_run["local_error"]
    assert "s3://" in two_node_run["local_error"]


def test_each_checkpoint_before_the_loss_is_written_from_both_nodes(two_node_run):
    before = {
        step: nodes
        for step, nodes in two_node_run["writers"].items()
        if int(step) <= two_node_run["metrics"]["resumed_from_step"]
    }
    assert before and all(nodes == sorted([two_node_run["head"], two_node_run["lost"]]) for nodes in before.values())


def test_losing_a_node_restarts_the_group_on_the_remaining_and_new_node_from_the_last_checkpoint(two_node_run):
    assert two_node_run["metrics"]["resumed_from_step"] in range(KILL_AFTER, STEPS, 10)
    assert two_node_run["metrics"]["step"] == STEPS
    assert two_node_run["writers"][str(STEPS)] == sorted([two_node_run["head"], two_node_run["added"]])
