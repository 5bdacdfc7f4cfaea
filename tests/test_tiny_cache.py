"""Tiny checkpoints are built once per cache; asking whether one is cached never builds it."""

import pytest

from miniature.checkpoints import cached_tiny_checkpoint, tiny_checkpoint


def test_a_tiny_checkpoint_counts_as_cached_only_once_built(tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path))
    assert cached_tiny_checkpoint("dino") is None
    assert not list(tmp_path.glob("tiny/dino-*")), "asking built the checkpoint"
    built = tiny_checkpoint("dino")
    assert (built / "config.json").is_file()
    assert cached_tiny_checkpoint("dino") == built


@pytest.mark.parametrize("ask", [tiny_checkpoint, cached_tiny_checkpoint])
def test_an_unknown_tiny_checkpoint_is_refused_naming_the_known_ones(ask):
    with pytest.raises(ValueError, match="tiny://vlm, tiny://dino, tiny://trellis"):
        ask("mesh")
