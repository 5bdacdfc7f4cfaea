"""Checkpoints by their hub names, resolved through huggingface_hub itself, and mirrored into object storage.

No test reaches the network: a hub on 127.0.0.1 (tests/hub_server.py, HF_ENDPOINT) lets huggingface_hub lay out a
real hub cache once; the checks then run with HF_HUB_OFFLINE=1 against that cache alone. huggingface_hub reads its
environment when imported, so every resolution runs in a process of its own, as on a node.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gap3d import hub
from miniature.checkpoints.paper_widths import write_paper_width_dino, write_paper_width_vlm
from miniature.checkpoints.trellis import write_tiny_trellis
from tests.hub_server import HubServer, commit_of

REPO = Path(__file__).resolve().parents[1]
VLM, DINO, TRELLIS = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "facebook/dinov2-with-registers-large",
    "microsoft/TRELLIS-image-large",
)


def run_python(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def resolved_json(code: str, env: dict) -> dict:
    """Run `code`, which prints one JSON line last, in a fresh process; its parsed output."""
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory) -> dict[str, Path]:
    """The paper's three checkpoints as hub repositories: config.json-only encoders, a tiny TRELLIS release."""
    root = tmp_path_factory.mktemp("hub-repos")
    write_paper_width_vlm(root / "vlm", weights=False)
    write_paper_width_dino(root / "dino", weights=False)
    write_tiny_trellis(root / "trellis", stage2=False)
    return {VLM: root / "vlm", DINO: root / "dino", TRELLIS: root / "trellis"}


@pytest.fixture(scope="module")
def hub_server(hub_repos):
    with HubServer(hub_repos) as server:
        yield server


@pytest.fixture(scope="module")
def offline_cache(hub_server, tmp_path_factory) -> dict:
    """A hub cache laid out by huggingface_hub from the loopback hub; returns the environment that reads it offline."""
    home = tmp_path_factory.mktemp("hf-home")
    online = {"HF_HOME": str(home), "HF_ENDPOINT": hub_server.endpoint, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    code = f"from gap3d.checkpoints import resolve; [resolve(n) for n in {[VLM, DINO, TRELLIS]!r}]; print('{{}}')"
    resolved_json(code, online)
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub_server.endpoint}


def test_a_hub_name_is_org_slash_name_with_an_optional_revision():
    assert hub.parse(VLM) == hub.HubName(VLM, None)
    assert hub.parse("microsoft/TRELLIS-image-large@v1.0") == hub.HubName(TRELLIS, "v1.0")
    assert hub.parse("org/name@refs/pr/3") == hub.HubName("org/name", "refs/pr/3")


@pytest.mark.parametrize(
    "uri", ["s3://bucket/models/x", "tiny://vlm", "/abs/org/name", "./org/name", "~/org/name", "runs/a/b", "name"]
)
def test_paths_uris_and_schemes_are_not_hub_names(uri):
    assert hub.parse(uri) is None


def test_an_existing_relative_directory_stays_local(tmp_path, monkeypatch):
    (tmp_path / "runs" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse("runs/export") is None
    assert hub.parse("runs/other") == hub.HubName("runs/other", None)


def test_the_paper_preset_derives_its_shapes_from_configs_resolved_by_name_offline(offline_cache, hub_server):
    before = sum(hub_server.requests.values())
    code = (
        "import json; from gap3d.build import derive_shapes; from gap3d.config import load_config\n"
        "c = derive_shapes(load_config('paper'))\n"
        "print(json.dumps({'paths': [c.vlm.path, c.dino.path], 'tokens': [c.aligner.num_tokens, c.aligner.token_dim],"
        " 'cond': [c.aligner.num_cond_tokens, c.aligner.cond_dim]}))"
    )
    shapes = resolved_json(code, offline_cache)
    assert shapes == {"paths": [VLM, DINO], "tokens": [1374, 1024], "cond": [64, 2048]}
    assert sum(hub_server.requests.values()) == before  # offline: the cache alone answered


def test_trellis_loads_by_its_name_from_the_cache(offline_cache, hub_repos):
    code = (
        "import json; from gap3d.trellis import Decoder; from gap3d.checkpoints import resolve\n"
        f"d = Decoder.from_pretrained({TRELLIS!r}, device='cpu', stages='coarse')\n"
        f"print(json.dumps({{'cond_dim': d.cond_dim, 'dir': resolve({TRELLIS!r}).name}}))"
    )
    loaded = resolved_json(code, offline_cache)
    assert loaded == {"cond_dim": 64, "dir": commit_of(hub_repos[TRELLIS])}


def test_a_name_pinned_to_its_commit_resolves_to_the_same_files(offline_cache, hub_repos):
    commit = commit_of(hub_repos[DINO])
    code = (
        "import json; from gap3d.checkpoints import fingerprint\n"
        f"print(json.dumps([fingerprint({DINO!r}), fingerprint({f'{DINO}@{commit}'!r})]))"
    )
    plain, pinned = resolved_json(code, offline_cache)
    assert plain == pinned


def test_a_name_missing_from_the_offline_cache_fails_naming_it_and_how_to_fetch_it(offline_cache):
    result = run_python("from gap3d.checkpoints import resolve; resolve('facebook/dinov2-large')", offline_cache)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "FileNotFoundError: checkpoint facebook/dinov2-large is not in the hub cache" in message
    assert "`hf download facebook/dinov2-large`" in message and "mirror-checkpoints" in message


def test_an_unknown_revision_fails_naming_it(hub_server, tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub_server.endpoint, "HF_HUB_OFFLINE": "0"}
    result = run_python(f"from gap3d.checkpoints import resolve; resolve('{DINO}@no-such-tag')", env)
    assert result.returncode != 0
    assert f"checkpoint {DINO}@no-such-tag: the hub repository has no revision 'no-such-tag'" in result.stderr


def test_mirroring_copies_named_checkpoints_to_object_storage_once(offline_cache, s3_bucket):
    command = [sys.executable, "-m", "cli", "mirror-checkpoints", "--to", f"{s3_bucket}/models", DINO, TRELLIS]
    env = {**os.environ, **offline_cache}
    first = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    mirrored = json.loads(first.stdout.strip().splitlines()[-1])["mirrored"]
    assert [(m["uri"], m["skipped"]) for m in mirrored] == [
        (f"{s3_bucket}/models/{DINO}", False),
        (f"{s3_bucket}/models/{TRELLIS}", False),
    ]
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert [m["skipped"] for m in json.loads(again.stdout.strip().splitlines()[-1])["mirrored"]] == [True, True]


def test_a_mirrored_copy_has_the_names_fingerprint_and_loads_from_object_storage(offline_cache, s3_bucket):
    copy = f"{s3_bucket}/models/{TRELLIS}"
    mirror = [sys.executable, "-m", "cli", "mirror-checkpoints", "--to", f"{s3_bucket}/models", TRELLIS]
    done = subprocess.run(mirror, env={**os.environ, **offline_cache}, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "import json; from gap3d.checkpoints import fingerprint; from gap3d.trellis import Decoder\n"
        f"Decoder.from_pretrained({copy!r}, device='cpu', stages='coarse')\n"
        f"print(json.dumps([fingerprint({TRELLIS!r}), fingerprint({copy!r})]))"
    )
    by_name, by_copy = resolved_json(code, offline_cache)
    assert by_name == by_copy
