"""Feature shards: rows round-trip through Arrow/Parquet, and the manifest guards encoder compatibility."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from gap3d.checkpoints import resolve
from gap3d.config import load_config
from gap3d.features.format import FeatureManifest, batch_from_rows, rows_to_table
from gap3d.features.identity import check_compatible, encoder_identity


def test_prompt_cache_rows_round_trip_through_parquet(tmp_path):
    rng = np.random.default_rng(0)
    dino = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2)]
    caches = [rng.standard_normal((2, 2, 1, n, 3)).astype(np.float32) for n in (3, 5)]
    rows = {
        "key": ["a", "b"],
        "caption": ["x", "y"],
        "input_ids": [[1, 2, 3], [1, 2, 3, 4, 5]],
        "dino": dino,
        "next_position": [3, 5],
        "prompt_cache": caches,
    }
    pq.write_table(rows_to_table(rows, "prompt_cache"), tmp_path / "f.parquet")
    table = pq.read_table(tmp_path / "f.parquet").to_pydict()
    manifest = FeatureManifest(encoders={}, dino_shape=[6, 4], cache_shape=[2, 2, 1, 3])
    batch = batch_from_rows(table, manifest)
    torch.testing.assert_close(batch.dino, torch.tensor(np.stack(dino)).half().float())
    assert [c.next_position for c in batch.caches] == [3, 5]
    for cache, original in zip(batch.caches, caches):
        torch.testing.assert_close(cache.key_values, torch.tensor(original).half().float())


def test_soft_latent_rows_restore_their_shape():
    latents = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    table = rows_to_table(
        {
            "key": ["a", "b"],
            "caption": ["x", "y"],
            "input_ids": [[1], [2]],
            "dino": [np.zeros(2)] * 2,
            "next_position": [1, 1],
            "soft_latents": list(latents),
        },
        "soft_latents",
    ).to_pydict()
    manifest = FeatureManifest(encoders={}, dino_shape=[1, 2], latents_shape=[3, 4])
    torch.testing.assert_close(batch_from_rows(table, manifest).latents, torch.tensor(latents))


def test_manifest_json_round_trip():
    manifest = FeatureManifest(
        encoders={"vlm_path": "/x"}, dino_shape=[261, 64], cache_shape=[2, 2, 2, 16], shards={"s": {"rows": 3}}
    )
    assert FeatureManifest.from_json(manifest.to_json(), "manifest.json") == manifest


def test_manifest_of_another_schema_version_asks_to_rerun_preprocessing():
    with pytest.raises(ValueError, match="re-run preprocessing"):
        FeatureManifest.from_json('{"schema_version": 0, "encoders": {}, "dino_shape": [1, 1]}', "manifest.json")


def copy_of_tiny_dino(directory, change_weights: bool) -> str:
    """The tiny DINOv2 checkpoint re-saved at `directory`, with one weight changed or not."""
    weights = load_file(resolve("tiny://dino") / "model.safetensors")
    if change_weights:
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1e-3
    directory.mkdir()
    shutil.copy(resolve("tiny://dino") / "config.json", directory / "config.json")
    save_file(weights, directory / "model.safetensors")
    return str(directory)


def test_features_from_encoders_with_other_weights_are_rejected_naming_the_checkpoint(tmp_path):
    config = load_config("tiny")
    manifest = FeatureManifest(encoders=encoder_identity(config), dino_shape=[69, 64])
    other = copy_of_tiny_dino(tmp_path / "dino", change_weights=True)
    with pytest.raises(ValueError, match=f"dino: features have .* config has .* \\(the checkpoint at {other}\\)"):
        check_compatible(manifest, load_config("tiny", overrides=[f"dino.path={other}"]))


def test_features_match_the_same_encoder_weights_stored_elsewhere(tmp_path):
    config = load_config("tiny")
    manifest = FeatureManifest(encoders=encoder_identity(config), dino_shape=[69, 64])
    same = copy_of_tiny_dino(tmp_path / "elsewhere", change_weights=False)
    check_compatible(manifest, load_config("tiny", overrides=[f"dino.path={same}"]))


def test_features_for_another_token_grid_are_rejected_naming_the_shape():
    config = load_config("tiny")
    manifest = FeatureManifest(encoders=encoder_identity(config), dino_shape=[261, 64])
    with pytest.raises(ValueError, match=r"shape \[261, 64\] but the configured encoders give \[69, 64\]"):
        check_compatible(manifest, config)


def test_tiny_encoders_built_in_another_cache_have_the_same_identity(tmp_path, monkeypatch):
    config = load_config("tiny")
    identity = encoder_identity(config)
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "other-cache"))
    assert resolve("tiny://vlm").is_relative_to(tmp_path) and resolve("tiny://dino").is_relative_to(tmp_path)
    assert encoder_identity(config) == identity
