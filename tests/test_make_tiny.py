"""`python -m cli make-tiny` writes a TRELLIS checkpoint the Decoder loads."""

import pytest
import torch

from cli.make_tiny import main
from gap3d.trellis.decoder import Decoder


def make_tiny(out, *flags):
    assert main(["--out", str(out), *flags]) == 0
    return Decoder.from_pretrained(str(out), device="cpu")


def test_make_tiny_writes_both_stages_unless_coarse_only(tmp_path):
    assert make_tiny(tmp_path / "full", "--steps", "1").default_stage == "full"
    assert make_tiny(tmp_path / "coarse", "--steps", "1", "--coarse-only").default_stage == "coarse"


def test_make_tiny_writes_a_loadable_checkpoint_with_the_requested_condition_width(tmp_path):
    decoder = make_tiny(tmp_path / "tiny", "--cond-dim", "24", "--steps", "2")
    assert decoder.cond_dim == 24
    assert decoder.pipeline.sparse_structure_sampler.steps == 2
    assert decoder.sample_sparse_structure(torch.zeros(1, 5, 24)).logits.shape == (1, 64, 64, 64)


def test_make_tiny_refuses_to_train_and_rescore_at_once(tmp_path):
    with pytest.raises(SystemExit, match="pick one"):
        main(["--out", str(tmp_path), "--trained", "--rescore"])
