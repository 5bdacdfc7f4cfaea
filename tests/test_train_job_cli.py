"""Training driven exactly as a user does: `ray start --head`, then `ray job submit -- python ray_jobs/train.py`.

Ray 2.60 enables token authentication for local clusters: the head and the job client must share a token.
The test generates one and gives it to both through RAY_AUTH_TOKEN (RAY_AUTH_MODE=token), so nothing is
written to ~/.ray. The head runs in its own session on free ports and a temporary directory; at the end
exactly the processes of that session are stopped (`ray stop` would stop every Ray on the machine).
"""

import os
import secrets
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port
from tests.support import SMALL_OVERRIDES, small_config, synthetic_features

REPO = Path(__file__).resolve().parents[1]


def _stop_session(session_id: int) -> None:
    """SIGTERM, then SIGKILL, every process of the session that `ray start` ran in."""

    def members():
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == session_id:
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    for proc in members():
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(members(), timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head (`ray start --head`) with token auth; yields (dashboard address, env for the CLI)."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rayhead-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    command = [
        "ray",
        "start",
        "--head",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    starter = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, output
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_session(starter.pid)


def test_ray_job_submit_trains_and_writes_a_checkpoint(ray_head, tmp_path):
    address, env = ray_head
    config = small_config()
    train, _ = synthetic_features(config, 200)
    storage = tmp_path / "runs"
    overrides = [*SMALL_OVERRIDES, "train.max_steps=10"]
    command = [
        "ray",
        "job",
        "submit",
        f"--address={address}",
        "--working-dir",
        ".",
        "--",
        "python",
        "ray_jobs/train.py",
        "--preset",
        "tiny",
        "--features",
        str(train),
        "--storage",
        str(storage),
        "--name",
        "cli",
        *overrides,
    ]
    job = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    checkpoint = storage / "cli" / "checkpoint_00000010"
    assert (checkpoint / "export" / "model.safetensors").is_file()
    assert (checkpoint / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


def test_ray_job_submit_without_the_token_is_refused(ray_head):
    address, env = ray_head
    without = {key: value for key, value in env.items() if key != "RAY_AUTH_TOKEN"}
    without["HOME"] = tempfile.mkdtemp()  # no ~/.ray/auth_token to fall back on
    job = subprocess.run(
        ["ray", "job", "list", f"--address={address}"], env=without, capture_output=True, text=True, timeout=120
    )
    assert job.returncode != 0 and "authentication" in (job.stdout + job.stderr).lower()
