"""Shared fixtures: a real S3 API server (moto) on 127.0.0.1, one local Ray cluster per session, tiny checkpoints."""

import os
import re
import subprocess
import sys
import tempfile

import pytest

from cli.broker import start_redis, wait_for_port
from serve.launch import free_port


def pytest_configure(config):
    # Tiny checkpoints (tiny://...) and downloads go to a cache of the session's own, unless the caller set one;
    # set before any Ray worker starts, so every process of the session shares it.
    os.environ.setdefault("GAP3D_CACHE", tempfile.mkdtemp(prefix="gap3d-test-cache-"))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in its own process; AWS_* variables point s3fs/pyarrow/boto3 at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    try:
        wait_for_port(port, timeout_s=30)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its s3:// URI."""
    import boto3

    name = ("gap3d-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole test session (start-up costs seconds). Started after the S3 server:
    Ray's workers take the environment of the process that starts the cluster, the S3 endpoint and keys included."""
    import ray

    from serve.proxy_guard import CALLBACK, CALLBACK_ENV

    # Serve's proxies cut request bodies past the upload limit, as on a deployed cluster (serve/proxy_guard.py).
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints():
    """Local directories of the tiny VLM and DINOv2 (tiny://vlm, tiny://dino): {'vlm': Path, 'dino': Path}."""
    from gap3d.checkpoints import resolve

    return {name: resolve(f"tiny://{name}") for name in ("vlm", "dino")}


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny preset, as every job resolves it by default, its shapes derived from the tiny encoders."""
    from gap3d.build import derive_shapes
    from gap3d.config import load_config

    return derive_shapes(load_config("tiny"))


SHORT_RUN_STEPS = 400  # enough for the tiny aligner to use the prompt on held-out pairs
SHORT_RUN_SCENES = 600  # the synthetic world it trains on (its train split), seed 0


@pytest.fixture(scope="session")
def short_run():
    """(config, world, trained): the tiny aligner trained in process for SHORT_RUN_STEPS on a SHORT_RUN_SCENES world.
    The learning test scores it and Table 3's test evaluates it; training is seeded, so sharing it changes no figure."""
    from gap3d.build import derive_shapes
    from gap3d.config import load_config
    from miniature.experiment import encode_world, train_in_process

    config = derive_shapes(load_config("tiny", overrides=[f"train.max_steps={SHORT_RUN_STEPS}"]))
    world = encode_world(config, SHORT_RUN_SCENES, seed=0)
    return config, world, train_in_process(config, world.train, SHORT_RUN_STEPS)


@pytest.fixture(scope="session")
def redis_broker():
    """A real Redis server on 127.0.0.1 (the async jobs' broker); yields its redis:// URL."""
    port = free_port()
    process = start_redis(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def serve_artifacts(tmp_path_factory, tiny_config):
    """Export + TRELLIS directories the test service loads: {'export': ..., 'trellis': ...}."""
    from tests.serving import write_artifacts

    return write_artifacts(tmp_path_factory.mktemp("serve_artifacts"), tiny_config)


@pytest.fixture(scope="session")
def service(ray_cluster, serve_artifacts, redis_broker, tmp_path_factory):
    """`serve run` of serve/config.yaml (session's artifacts, broker, job store, API key on); yields its base URL."""
    from ray import serve

    from serve.launch import serve_run
    from tests.serving import service_config

    root = tmp_path_factory.mktemp("service")
    config = service_config(free_port(), serve_artifacts, redis_broker, str(root / "jobs"))
    try:
        yield serve_run(config, root / "config.yaml", ray_cluster.get_runtime_context().gcs_address)
    finally:
        serve.shutdown()
