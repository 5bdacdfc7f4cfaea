"""Tiny checkpoints: the encoders are built once per cache, tiny://trellis is shipped, unknown names are refused."""

import pytest

from miniature.checkpoints import SHIPPED, tiny_checkpoint


def test_a_tiny_encoder_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path))
    built = tiny_checkpoint("dino")
    assert (built / "config.json").is_file() and built.is_relative_to(tmp_path)
    stamp = (built / "config.json").stat().st_mtime_ns
    assert tiny_checkpoint("dino") == built and (built / "config.json").stat().st_mtime_ns == stamp


def test_tiny_trellis_is_the_release_shipped_in_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path))
    assert tiny_checkpoint("trellis") == SHIPPED["trellis"]
    assert not list(tmp_path.iterdir()), "resolving the shipped release built something"


def test_an_unknown_tiny_checkpoint_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="tiny://vlm, tiny://dino, .*tiny://trellis"):
        tiny_checkpoint("mesh")
