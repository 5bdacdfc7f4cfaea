"""ray_jobs/parallelize.py: activation checkpointing changes memory, never the math or the parameter names."""

import copy

import pytest
import torch

from gap3d.aligner import AlignerDiT
from gap3d.config import AlignerConfig, load_config
from ray_jobs.parallelize import apply_activation_checkpointing, deepspeed_config

CONFIG = AlignerConfig(
    token_dim=16,
    grid_size=4,
    num_special_tokens=5,
    cond_dim=12,
    num_cond_tokens=3,
    hidden_size=32,
    depth=2,
    num_heads=2,
)


def aligner_pair() -> tuple[AlignerDiT, AlignerDiT]:
    torch.manual_seed(0)
    plain = AlignerDiT(CONFIG)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)  # leave the zero-init so every block's gradient is non-trivial
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed)
    return plain, checkpointed


def loss_and_grads(aligner: AlignerDiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, CONFIG.num_tokens, CONFIG.token_dim, generator=generator)
    cond = torch.randn(2, CONFIG.num_cond_tokens, CONFIG.cond_dim, generator=generator)
    loss = aligner(x, torch.tensor([0.3, 0.8]), cond).pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in aligner.named_parameters() if p.grad is not None}


def test_checkpointed_aligner_gives_the_same_loss_and_gradients():
    plain, checkpointed = aligner_pair()
    loss, grads = loss_and_grads(plain)
    loss_ac, grads_ac = loss_and_grads(checkpointed)
    torch.testing.assert_close(loss_ac, loss)
    assert grads_ac.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], msg=name)


def test_checkpointed_blocks_run_their_forward_again_in_backward():
    plain, checkpointed = aligner_pair()
    calls = {"plain": 0, "checkpointed": 0}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        for block in model.blocks:
            block.attn.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        loss_and_grads(model)
    assert calls == {"plain": CONFIG.depth, "checkpointed": 2 * CONFIG.depth}


def test_checkpointing_keeps_parameter_names_so_exports_load_into_a_plain_aligner():
    plain, checkpointed = aligner_pair()
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    AlignerDiT(CONFIG).load_state_dict(checkpointed.state_dict(), strict=True)


def test_deepspeed_reads_the_training_knobs_from_our_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = load_config("tiny", overrides=["train.precision=bf16", "train.grad_accum_steps=2", "train.grad_clip=0.5"])
    # One process (no process group): DeepSpeed checks global batch = micro batch x accumulation x 1.
    parsed = DeepSpeedConfig(deepspeed_config(config, zero_stage=2, micro_batch=config.train.global_batch_size // 2))
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (config.train.global_batch_size, 2)
    assert (parsed.zero_optimization_stage, parsed.bfloat16_config.enabled, parsed.gradient_clipping) == (2, True, 0.5)


def test_deepspeed_rejects_a_micro_batch_that_does_not_make_the_global_batch():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = load_config("tiny", overrides=["train.grad_accum_steps=2"])
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(deepspeed_config(config, zero_stage=1, micro_batch=3))
