"""Inference export: EMA aligner + soft tokens + config round trip, loadable with plain PyTorch."""

import json
import subprocess
import sys

import pytest
import torch

from gap3d.build import build_aligner
from gap3d.export import META_NAME, apply_soft_tokens, load_export, save_export
from gap3d.prompt_encoder import PromptEncoder
from tests.support import small_config


@pytest.fixture(scope="module")
def config():
    return small_config()


def test_export_round_trip_reproduces_the_aligner_and_soft_tokens(config, tmp_path):
    aligner = build_aligner(config, seed=1)
    torch.nn.init.normal_(aligner.final_layer.linear.weight)  # non-zero output, so a wrong load shows
    soft_tokens = torch.randn(config.vlm.num_soft_tokens, config.aligner.cond_dim)
    save_export(tmp_path, aligner.state_dict(), soft_tokens, config, step=7)
    loaded = load_export(str(tmp_path))
    x = torch.randn(2, config.aligner.num_tokens, config.aligner.token_dim)
    t, cond = torch.rand(2), torch.randn(2, config.aligner.num_cond_tokens, config.aligner.cond_dim)
    with torch.no_grad():
        torch.testing.assert_close(loaded.aligner(x, t, cond), aligner(x, t, cond))
    torch.testing.assert_close(loaded.soft_tokens, soft_tokens)
    assert loaded.step == 7 and loaded.config == config and not loaded.aligner.training


def test_export_without_trained_soft_tokens_keeps_the_seeded_ones(config, tmp_path):
    save_export(tmp_path, build_aligner(config, seed=0).state_dict(), None, config, step=0)
    loaded = load_export(str(tmp_path))
    assert loaded.soft_tokens is None
    encoder = PromptEncoder.from_pretrained(config.vlm)
    before = encoder.soft_tokens.detach().clone()
    apply_soft_tokens(encoder, loaded.soft_tokens)
    assert torch.equal(encoder.soft_tokens.detach(), before)


def test_apply_soft_tokens_copies_them_into_the_prompt_encoder(config):
    encoder = PromptEncoder.from_pretrained(config.vlm)
    tokens = torch.randn_like(encoder.soft_tokens)
    apply_soft_tokens(encoder, tokens)
    torch.testing.assert_close(encoder.soft_tokens.detach(), tokens)
    with pytest.raises(ValueError, match="exported soft tokens are"):
        apply_soft_tokens(encoder, tokens[:2])


def test_export_of_another_format_version_is_refused(config, tmp_path):
    save_export(tmp_path, build_aligner(config, seed=0).state_dict(), None, config, step=0)
    meta = json.loads((tmp_path / META_NAME).read_text())
    (tmp_path / META_NAME).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="v99"):
        load_export(str(tmp_path))


def test_a_directory_without_an_export_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is neither an aligner export"):
        load_export(str(tmp_path))


def test_export_loads_in_a_process_without_ray_or_deepspeed(config, tmp_path):
    save_export(tmp_path, build_aligner(config, seed=0).state_dict(), torch.zeros(8, 64), config, step=3)
    script = (
        "import sys, torch; from gap3d.export import load_export; e = load_export(sys.argv[1]); "
        "assert 'ray' not in sys.modules and 'deepspeed' not in sys.modules, 'export loading imported ray/deepspeed'; "
        "print(e.step, tuple(e.soft_tokens.shape))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "(8,", "64)"]


def test_stages_that_never_sample_load_the_config_and_soft_tokens_without_the_aligner(config, tmp_path):
    soft_tokens = torch.randn(config.vlm.num_soft_tokens, config.aligner.cond_dim)
    save_export(tmp_path, build_aligner(config, seed=0).state_dict(), soft_tokens, config, step=3)
    loaded = load_export(str(tmp_path), with_aligner=False)
    assert loaded.aligner is None and loaded.config == config and loaded.step == 3
    torch.testing.assert_close(loaded.soft_tokens, soft_tokens)


def test_the_loaded_aligner_recomputes_its_non_persistent_buffers(config, tmp_path):
    aligner = build_aligner(config, seed=0)
    save_export(tmp_path, aligner.state_dict(), None, config, step=0)
    loaded = load_export(str(tmp_path)).aligner  # built on the meta device, then given the stored tensors
    assert not any(tensor.is_meta for tensor in [*loaded.parameters(), *loaded.buffers()])
    torch.testing.assert_close(loaded.rope_cos, aligner.rope_cos)
    torch.testing.assert_close(loaded.rope_sin, aligner.rope_sin)
