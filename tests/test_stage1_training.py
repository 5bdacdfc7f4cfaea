"""Stage-1 training at toy size: exact resume, the latent rescale, and a release the Decoder loads unchanged."""

import json

import pytest
import torch

from gap3d.trellis.decoder import Decoder
from gap3d.trellis.stage1_training import Stage1Config, Stage1Trainer

TOY = {
    "resolution": 8,
    "vae_channels": [4, 8],
    "flow_width": 16,
    "flow_blocks": 1,
    "flow_heads": 2,
    "vae_steps": 3,
    "flow_steps": 3,
    "vae_batch_size": 2,
    "flow_batch_size": 2,
}


def toy_data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 8, 8, 8, generator=generator) < 0.2, torch.randn(n, 5, 12, generator=generator)


def test_a_run_cut_and_resumed_matches_a_straight_run_exactly():
    occupancy, cond = toy_data()
    straight = Stage1Trainer(Stage1Config(**TOY), occupancy, cond)
    straight.fit()
    first = Stage1Trainer(Stage1Config(**TOY), occupancy, cond)
    for _ in range(4):  # past the VAE phase, into the flow's
        first.train_step()
    resumed = Stage1Trainer(Stage1Config(**TOY), occupancy, cond)
    resumed.load_state_dict(first.state_dict())
    resumed.fit()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for name, model in straight.models.items():
        for key, value in model.state_dict().items():
            torch.testing.assert_close(resumed.models[name].state_dict()[key], value, rtol=0, atol=0)


def test_the_latent_rescale_keeps_what_the_decoder_reconstructs():
    occupancy, cond = toy_data()
    trainer = Stage1Trainer(Stage1Config(**{**TOY, "flow_steps": 0}), occupancy, cond)
    while trainer.step < trainer.config.vae_steps:
        trainer.train_step()
    with torch.no_grad():
        before = trainer.decoder(trainer.encode(occupancy))
    trainer.fit()
    with torch.no_grad():
        after = trainer.decoder(trainer.encode(occupancy))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert float(trainer.latents.std()) == pytest.approx(1.0, rel=1e-4)


def test_the_release_loads_through_the_decoder_and_decodes_its_grid(tmp_path):
    occupancy, cond = toy_data()
    trainer = Stage1Trainer(Stage1Config(**TOY), occupancy, cond)
    trainer.fit()
    root = trainer.write_release(tmp_path / "release")
    pipeline = json.loads((root / "pipeline.json").read_text())
    assert set(pipeline["args"]["models"]) >= {"sparse_structure_flow_model", "sparse_structure_decoder"}
    decoder = Decoder.from_pretrained(str(root), device="cpu", stages="coarse")
    assert decoder.structure_resolution == 8 and decoder.cond_dim == 12
    structure = decoder.sample_sparse_structure(cond[:2], seed=[0, 1], steps=2)
    assert structure.logits.shape == (2, 8, 8, 8)
    with torch.no_grad():
        released_flow = decoder.flow_model(torch.zeros(1, 8, 4, 4, 4), torch.tensor([500.0]), cond[:1])
        ema_flow = trainer.flow_for_release()(torch.zeros(1, 8, 4, 4, 4), torch.tensor([500.0]), cond[:1])
    torch.testing.assert_close(released_flow, ema_flow)


def test_bad_shapes_and_settings_name_what_to_fix():
    occupancy, cond = toy_data()
    with pytest.raises(ValueError, match="occupancy must be"):
        Stage1Trainer(Stage1Config(**TOY), occupancy[:, :4], cond)
    with pytest.raises(ValueError, match="cond must be"):
        Stage1Trainer(Stage1Config(**TOY), occupancy, cond[:3])
    with pytest.raises(ValueError, match="resolution 12"):
        Stage1Config(**{**TOY, "resolution": 12, "patch_size": 4})
    with pytest.raises(ValueError, match="p_uncond"):
        Stage1Config(p_uncond=1.0)
