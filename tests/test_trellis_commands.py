"""`gap3d trellis make-tiny` writes a checkpoint the Decoder loads."""

import argparse

import torch

from gap3d.trellis import commands
from gap3d.trellis.decoder import Decoder


def test_make_tiny_writes_a_loadable_checkpoint_with_the_requested_condition_width(tmp_path):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["trellis", "make-tiny", "--out", str(tmp_path / "tiny"), "--cond-dim", "24", "--steps", "2"])
    args.func(args)
    decoder = Decoder.from_pretrained(str(tmp_path / "tiny"), device="cpu")
    assert decoder.cond_dim == 24
    assert decoder.pipeline.sparse_structure_sampler.steps == 2
    assert decoder.sample_sparse_structure(torch.zeros(1, 5, 24)).logits.shape == (1, 64, 64, 64)
